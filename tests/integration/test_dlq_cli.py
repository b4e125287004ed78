"""`agentfabric dlq` against the real embedded broker and Redis: list with filters, show,
replay (dry run, lineage, a run completed after the fix, a second replay that runs nothing),
purge (markers in Redis; the topic keeps its records)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from agentfabric.app import build_engine, provision
from agentfabric.errors import TransientError
from agentfabric.settings import Settings
from agentfabric.tenancy import TenantPolicy
from agentfabric.worker import background_worker
from schemas.models import DeadLetter
from streams.batching import PipelinedRedis
from streams.claims import CLAIM_HEADER, ClaimStore
from streams.dlq import replay_of
from streams.kafka import Outgoing, Producer, make_consumer
from streams.reader import read_topic
from streams.topics import TopicNames
from tools.registry import ToolCall

from .helpers import (
    cases,
    check_results,
    collect_dead_letters,
    collect_results,
    publish_cases,
    running_worker,
)
from .test_cli import cli, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def send(settings: Settings, messages: list[Outgoing]) -> None:
    producer = Producer(settings)
    await producer.start()
    try:
        await producer.send_all(messages)
    finally:
        await producer.stop()


async def count_records(settings: Settings, topic: str) -> int:
    return len([r async for r in read_topic(settings, topic)])


def rows(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def flat(text: str) -> str:
    return " ".join(text.split())


async def test_list_filters_dry_run_sends_nothing_and_purge_hides(settings: Settings) -> None:
    env = settings_env(settings)
    trigger = TopicNames(settings.topic_prefix).trigger("crm")
    async with running_worker(settings):
        await send(settings, [
            Outgoing(trigger, b"not-json", b"\x00 this is not json"),
            Outgoing(trigger, b"nobody", json.dumps({"event_type": "lead.nope",
                                                     "payload": {}}).encode())])
        letters = await collect_dead_letters(settings, 2)
    [bad] = [d for d in letters if d.error_type == "DecodeError"]
    assert {d.error_type for d in letters} == {"DecodeError", "UnroutableEventError"}

    listed = cli("dlq", "list", "--error", "DecodeError", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    [row] = rows(listed.stdout)
    assert (row["dead_letter_id"], row["transient"], row["purged"]) == \
        (bad.dead_letter_id, False, False)
    assert row["topic"] == trigger
    assert row["key"] == "not-json"
    table = cli("dlq", "list", "--error", "decodeerror", "--since", "1h", env=env)
    assert "Dead letters: 1" in table.stdout
    assert bad.dead_letter_id[:8] in table.stdout
    assert "│ DecodeError │ permanent │" in table.stdout
    assert len(rows(cli("dlq", "list", "--since", "2000-01-01", "--json", env=env).stdout)) == 2
    assert cli("dlq", "list", "--workflow", "lead_enrichment", "--json", env=env).stdout == ""

    dry = cli("dlq", "replay", bad.dead_letter_id[:8], "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would replay {bad.dead_letter_id} -> {trigger}  key not-json" in dry.stdout
    assert "dry run: would replay 1 dead letter; nothing was sent" in flat(dry.stdout)
    assert await count_records(settings, trigger) == 2, "a dry run sends nothing"

    nothing_named = cli("dlq", "replay", env=env)
    assert nothing_named.returncode == 2
    assert "name the dead letters to replay" in nothing_named.stderr

    declined = cli("dlq", "purge", "--error", "DecodeError", env=env, stdin="n\n")
    assert declined.returncode == 1
    assert "Purge 1 dead letter?" in declined.stdout
    assert len(rows(cli("dlq", "list", "--json", env=env).stdout)) == 2

    purged = cli("dlq", "purge", "--error", "DecodeError", "--yes", env=env)
    assert purged.returncode == 0, purged.stderr
    assert f"purged 1 dead letter (the records stay on {settings.topic_prefix}.dlq" in \
        flat(purged.stdout)
    [left] = rows(cli("dlq", "list", "--json", env=env).stdout)
    assert left["error_type"] == "UnroutableEventError"
    assert "(1 purged not shown; --all shows them)" in cli("dlq", "list", env=env).stdout
    every = {r["dead_letter_id"]: r["purged"]
             for r in rows(cli("dlq", "list", "--all", "--json", env=env).stdout)}
    assert every == {bad.dead_letter_id: True, left["dead_letter_id"]: False}
    assert f"{bad.dead_letter_id[:8]} (purged)" in flat(cli("dlq", "list", "--all", env=env).stdout)
    skipped = cli("dlq", "replay", "--error", "DecodeError", env=env)
    assert skipped.returncode == 0, skipped.stderr
    assert "replayed 0 dead letters (1 purged skipped)" in skipped.stdout
    assert "(purged)" in cli("dlq", "show", bad.dead_letter_id, env=env).stdout
    again = cli("dlq", "purge", "--error", "DecodeError", "--yes", env=env)
    assert "nothing to purge" in again.stdout
    assert await count_records(settings, f"{settings.topic_prefix}.dlq") == 2, \
        "purge hides dead letters; the append-only topic keeps them"


async def test_a_replay_that_fails_again_names_its_new_dead_letter(settings: Settings) -> None:
    env = settings_env(settings)
    trigger = TopicNames(settings.topic_prefix).trigger("crm")
    async with running_worker(settings):
        await send(settings, [Outgoing(trigger, b"not-json", b"\x00 still not json",
                                       (("x-api-key", b"sk-secret"),))])
        [first] = await collect_dead_letters(settings, 1)
        replayed = await asyncio.to_thread(cli, "dlq", "replay", first.dead_letter_id, env=env)
        assert replayed.returncode == 0, replayed.stderr
        assert f"replayed {first.dead_letter_id} -> {trigger}  key not-json" in replayed.stdout
        assert "replayed 1 dead letter" in replayed.stdout
        [_, second] = await collect_dead_letters(settings, 2)
    assert replay_of(second) == first.dead_letter_id
    assert second.value == first.value
    assert "x-api-key" not in {h.key for h in second.headers}, "redacted headers stay behind"
    again = cli("dlq", "replay", first.dead_letter_id, env=env)
    assert again.returncode == 1
    assert (f"cannot replay {first.dead_letter_id}: it was replayed and failed again as "
            f"{second.dead_letter_id}; replay that one") in flat(again.stdout)
    shown = flat(cli("dlq", "show", first.dead_letter_id[:8], env=env).stdout)
    assert f"replay failed again, as {second.dead_letter_id}" in shown
    assert f"replay of {first.dead_letter_id}" in flat(
        cli("dlq", "show", second.dead_letter_id, env=env).stdout)


class FlakyAccounts:
    """The accounts tool is down (a transient failure) until ``fixed``; counts good calls."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.fixed = False
        self.served = 0

    async def __call__(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        if name == "crm.get_account":
            if not self.fixed:
                raise TransientError("the accounts service is unavailable; it comes back soon")
            self.served += 1
        return await self.call(name, arguments, call)


@contextlib.asynccontextmanager
async def flaky_worker(settings: Settings) -> AsyncIterator[FlakyAccounts]:
    engine = build_engine(settings)
    flaky = FlakyAccounts(engine.tools.call)
    engine.tools.call = flaky  # type: ignore[method-assign]
    await provision(settings, engine)
    async with background_worker(settings, engine):
        yield flaky


async def all_consumed(settings: Settings, group: str, topic: str, within: float = 20) -> None:
    """Wait until ``group`` has committed the end of every partition of ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        end = {tp: await count_on(settings, tp) for tp in tps}
        async with asyncio.timeout(within):
            while True:
                found = await admin.list_consumer_group_offsets(group, partitions=tps)
                if all((found.get(tp) is not None and found[tp].offset >= end[tp])
                       for tp in tps if end[tp] > 0):
                    return
                await asyncio.sleep(0.05)  # polling a condition on the broker, not a delay
    finally:
        await admin.close()


async def count_on(settings: Settings, tp: TopicPartition) -> int:
    return len([r async for r in read_topic(settings, tp.topic) if r.partition == tp.partition])


async def test_replay_completes_a_dead_lettered_run_once_the_cause_is_fixed(
        settings: Settings) -> None:
    """A step fails transiently until its attempts run out and dead-letters; after the fix,
    `dlq replay` completes the run; replaying the same dead letter again runs nothing."""
    quick = settings.model_copy(update={"max_attempts": 2, "retry_tiers_s": [0.2]})
    env = settings_env(quick)
    names = TopicNames(quick.topic_prefix)
    [case] = [c for c in cases(2, seed=11) if c.workflow == "lead_enrichment"]
    async with flaky_worker(quick) as accounts:
        await publish_cases(quick, [case])
        [letter] = await collect_dead_letters(quick, 1)
        assert (letter.step, letter.transient, letter.attempts) == ("enrich", True, 2)
        assert letter.first_failed_at is not None
        assert letter.first_failed_at < letter.failed_at
        accounts.fixed = True
        replayed = await asyncio.to_thread(cli, "dlq", "replay", letter.dead_letter_id, env=env)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert (f"replayed {letter.dead_letter_id} -> {names.step('lead_enrichment', 'enrich')}"
                f"  run {case.run_id}") in replayed.stdout
        assert "note:" not in replayed.stdout, "v1 is loaded: a fresh deadline, no notes"
        results = await collect_results(quick, "lead_enrichment", 1, within=30)
        check_results([case], results)
        assert accounts.served == 1
        by_filter = await asyncio.to_thread(cli, "dlq", "replay", "--workflow",
                                            "lead_enrichment", "--error", "TransientError",
                                            env=env)
        assert by_filter.returncode == 0, by_filter.stdout + by_filter.stderr
        assert "replayed 0 dead letters (1 replayed before skipped" in by_filter.stdout
        again = await asyncio.to_thread(cli, "dlq", "replay", letter.dead_letter_id[:8],
                                        env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "replayed 1 dead letter" in again.stdout
        assert "note: replayed before at" in again.stdout
        await all_consumed(quick, names.step_group("lead_enrichment", "enrich"),
                           names.step("lead_enrichment", "enrich"))
        await all_consumed(quick, names.step_group("lead_enrichment", "score"),
                           names.step("lead_enrichment", "score"))
    assert accounts.served == 1, "the second replay ran the step again"
    finals = [r async for r in read_topic(quick, names.results("lead_enrichment"))]
    assert len(finals) == 1, "the second replay produced a second result"
    assert await count_records(quick, names.dlq) == 1, "the second replay dead-lettered"
    [row] = rows(cli("dlq", "list", "--json", env=env).stdout)
    assert row["replayed_at"] is not None
    assert "(replayed)" in cli("dlq", "list", env=env).stdout


async def test_a_dead_letter_cut_short_replays_its_full_value_from_the_claim_check(
        settings: Settings) -> None:
    """A dead letter too large for the broker keeps an excerpt and its full bytes in a claim
    check: replay sends the full bytes (as a claim check again, being over the threshold),
    and one whose claim check expired is reported, not replayed as the excerpt."""
    from redis.asyncio import Redis

    # the dead letter came from a foreign producer whose crm events are acme's
    big = settings.model_copy(update={"claim_check_bytes": 64 * 1024, "trigger_tenants": {
        "crm": TenantPolicy(fixed="acme")}})
    env = {**settings_env(big), "AGENTFABRIC_CLAIM_CHECK_BYTES": str(64 * 1024)}
    names = TopicNames(big.topic_prefix)
    event = {"event_type": "lead.created", "event_id": "huge-1", "tenant": "acme",
             "payload": {"lead_id": "L-huge", "email": "pat@contoso.com",
                         "notes": "n" * 200_000}}
    original = json.dumps(event).encode()
    redis = Redis.from_url(big.redis_url)
    try:
        digest = await ClaimStore(PipelinedRedis(redis), big.topic_prefix,
                                  big.idempotency_ttl_s, big.claim_check_bytes).put(original)
    finally:
        await redis.aclose()
    cut = {"reason": "the broker refused a message (the original value of 200000 bytes was "
                     "too large for the dead-letter topic; only its first 65536 bytes are "
                     "kept)", "error_type": "PermanentError", "topic": names.trigger("crm"),
           "partition": 0, "offset": 0, "consumer_group": names.router_group,
           "key": b"huge-1", "value": original[:65536]}
    kept = DeadLetter(dead_letter_id="cafe0001-claimed", value_claim=digest, **cut)
    lost = DeadLetter(dead_letter_id="cafe0002-expired", value_claim="0" * 64, **cut)
    async with running_worker(big):
        await send(big, [Outgoing.of(names.dlq, "huge-1", kept),
                         Outgoing.of(names.dlq, "huge-1", lost)])
        replayed = await asyncio.to_thread(cli, "dlq", "replay", "cafe0001", "cafe0002",
                                           env=env)
        assert replayed.returncode == 1, replayed.stdout + replayed.stderr
        out = flat(replayed.stdout)
        assert f"replayed cafe0001-claimed -> {names.trigger('crm')} key huge-1" in out
        assert "cannot replay cafe0002-expired: the message's value was stored as claim " \
               "check 0000000000000000, which is no longer in Redis" in out
        assert "replayed 1 dead letter (1 cannot be replayed)" in out
        [result] = await collect_results(big, "lead_enrichment", 1)
    assert result.output["lead_id"] == "L-huge"
    [sent] = await raw_records(big, names.trigger("crm"))
    assert sent.value == b"", "over the threshold, it travels as a claim check"
    assert dict(sent.headers)[CLAIM_HEADER] == digest.encode()


async def raw_records(settings: Settings, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` as the broker holds it (claim checks not put back)."""
    consumer = make_consumer(settings, None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        found: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(10):
            while len(found) < sum(end.values()):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(records)
        return found
    finally:
        await consumer.stop()
