"""Fuzz: records no well-behaved producer writes, into trigger, step and retry topics, with
good events interleaved, through one worker process.

A seeded generator (``random.Random``, seed ``AF_FAULTS_SEED``, default fixed;
hypothesis is not a dependency) makes random bytes,
random JSON, 100,000-level deep JSON, records within 1 KiB of the size limit, header keys
that are not UTF-8, wrong schema headers (a ``step_message.v4`` body labelled v2 or v1, an
unknown version, trailing bytes, another message's schema), tombstones, and messages that
decode but name an unknown workflow or step. Between them go good trigger events (Avro and
plain JSON from a foreign producer, one within 1 KiB of the limit) and good step messages
written straight to step topics.

The size limit is found by trying: the embedded broker takes far larger records, so the
limit that matters is the largest value a producer with Kafka's default
``max_request_size`` (1 MiB, agentfabric's own producer too) can write.

Expected: the worker never exits; every good event gets exactly one result, as the oracle
says; every bad record exactly one dead letter with a reason (an oversized one keeps an
excerpt and its full bytes in a claim check); nothing else is dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from agentfabric.settings import Settings
from agentfabric.tenancy import TenantPolicy
from schemas.models import DeadLetter, RunResult
from streams.kafka import Outgoing, Producer
from streams.topics import TopicNames
from tests.integration.helpers import cases, publish_cases

from .fuzzing import largest_value, make_plan, send_bad
from .harness import provision
from .procs import Workers
from .records import Follower, dead_letters_of, one_result_each

pytestmark = [pytest.mark.timeout(300)]

SEED = int(os.environ.get("AF_FAULTS_SEED", "20261122"))  # another seed: another fuzz
GOOD_CASES = 300
ALLOWED_ERRORS = {"DecodeError", "MessageValidationError", "UnroutableEventError",
                  "UnknownWorkflowError", "UnknownStepError", "ToolError", "ToolArgumentsError",
                  "ExpressionEvalError"}


async def test_fuzzed_records_never_stop_the_worker(settings: Settings,
                                                   tmp_path: Path) -> None:
    # the foreign JSON events name tenant acme: their sources are configured so
    acme = TenantPolicy(fixed="acme")
    settings = settings.model_copy(update={"trigger_tenants": {"crm": acme, "erp": acme}})
    names = TopicNames(settings.topic_prefix)
    await provision(settings)
    probed = time.monotonic()
    limit, broker_takes_more = await largest_value(settings, f"{settings.topic_prefix}.probe")
    probe_s = time.monotonic() - probed
    plan = make_plan(settings, SEED, limit)
    good = cases(GOOD_CASES, seed=SEED)
    every_case = [*good, *(c for c, _ in plan.good_steps), *(c for _, _, c in plan.good_foreign)]
    expected = {wf: {c.run_id: c.event.event_id for c in every_case if c.workflow == wf}
                for wf in ("lead_enrichment", "invoice_triage")}
    by_dead_key = {b.dead_key or b.label: b for b in plan.bad}
    workers = Workers(settings, tmp_path)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0)
    await producer.start()
    fabric = Producer(settings)
    await fabric.start()
    try:
        async with Follower(settings, names.results("lead_enrichment"), RunResult) as leads, \
                Follower(settings, names.results("invoice_triage"), RunResult) as invoices, \
                Follower(settings, names.dlq, DeadLetter) as letters:
            worker = workers.start()
            await worker.ready()
            started = time.monotonic()
            rounds = 10
            for r in range(rounds):  # good and bad interleaved, a round at a time
                await publish_cases(settings, good[r::rounds])
                for _case, message in plan.good_steps[r::rounds]:
                    await fabric.send_all([Outgoing.of(names.step(message.workflow,
                                                                  message.step),
                                                       message.run_id, message)])
                for topic, body, case in plan.good_foreign[r::rounds]:
                    await producer.send_and_wait(topic, body, key=case.event.event_id.encode())
                for bad in plan.bad[r::rounds]:
                    await send_bad(producer, bad)
                workers.check()

            def finished() -> bool:
                ran = {r.run_id for r in (*leads.found, *invoices.found)}
                return (len(ran) >= sum(len(e) for e in expected.values())
                        and len(letters.found) >= len(plan.bad))

            deadline = time.monotonic() + 180
            while not finished():
                workers.check()
                assert time.monotonic() < deadline, (
                    f"{len(leads.found) + len(invoices.found)} results, "
                    f"{len(letters.found)} of {len(plan.bad)} dead letters")
                await asyncio.sleep(0.2)
            wall_s = time.monotonic() - started
            alive = worker.alive()
        code = await worker.stop()
    finally:
        await workers.close()
        await producer.stop()
        await fabric.stop()

    outcomes = {wf: await one_result_each(settings, runs, wf) for wf, runs in expected.items()}
    dead = await dead_letters_of(settings)
    kinds = Counter(b.kind for b in plan.bad)
    errors = Counter(d.error_type for d in dead)
    oversized = [d for d in dead if by_dead_key.get(_key(d)) is not None
                 and "near the limit" in by_dead_key[_key(d)].kind]
    print(f"\n[fuzz] seed {SEED}: size limit found by trying {limit} bytes per value "
          f"({probe_s:.1f}s; the broker took 4x that: {broker_takes_more}); "
          f"{len(plan.bad)} bad records ({len(kinds)} kinds) and "
          f"{sum(len(e) for e in expected.values())} good runs ({len(good)} Avro triggers, "
          f"{len(plan.good_steps)} step messages, {len(plan.good_foreign)} foreign JSON, one "
          f"within 1 KiB of the limit) in {wall_s:.1f}s; worker alive {alive}, exit {code}, "
          f"processed {worker.processed()}")
    print(f"  dead letters {len(dead)} by error: {dict(errors)}; results "
          f"{sum(o.records for o in outcomes.values())} records")
    print("  kinds: " + "; ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))

    assert alive
    assert code == 0
    for case in every_case:
        output = outcomes[case.workflow].results[case.run_id].output
        for key, value in case.expected.items():
            assert output[key] == value, (case.event.event_id, key, output)
    assert all(o.records == len(o.results) for o in outcomes.values()), "a run has two results"
    keys = Counter(_key(d) for d in dead)
    assert not [k for k in keys if k not in by_dead_key], \
        f"dead letters of good records: {[k for k in keys if k not in by_dead_key][:5]}"
    assert not [b.label for b in plan.bad if keys[b.dead_key or b.label] != 1], [
        (b.label, b.kind, keys[b.dead_key or b.label]) for b in plan.bad
        if keys[b.dead_key or b.label] != 1][:10]
    excerpts: list[str] = []
    redis = Redis.from_url(settings.redis_url)
    try:
        for letter in dead:
            bad = by_dead_key[_key(letter)]
            what = (bad.label, bad.kind, letter.error_type, letter.reason)
            assert letter.error_type in ALLOWED_ERRORS, what
            assert len(letter.reason) >= 20, what
            assert not letter.transient, what
            if bad.error is not None:
                assert letter.error_type == bad.error, what
            if bad.says is not None:
                assert bad.says in letter.reason, what
            if bad.dead_key:
                continue
            assert letter.topic == bad.topic, what
            if letter.value == bad.value:
                continue
            # the dead letter was too large to send whole: an excerpt, the rest in Redis
            assert bad.value is not None, what
            assert len(bad.value) >= limit - 1024, what
            excerpts.append(bad.label)
            claim = getattr(letter, "value_claim", None)
            assert claim, f"no claim check for the full bytes: {what}"
            assert await redis.get(f"{settings.topic_prefix}:claim:{claim}") == bad.value
            assert letter.value == bad.value[:len(letter.value or b"")], what
            assert "too large" in letter.reason, what
    finally:
        await redis.aclose()
    print(f"  {len(oversized)} dead letters of records within 1 KiB of the limit, "
          f"{len(excerpts)} of them too large to send whole (an excerpt, the full bytes in a "
          f"claim check)")
    assert excerpts, "no dead letter was too large: the excerpt path was not tested"


def _key(letter: DeadLetter) -> str:
    return (letter.key or b"").decode("utf-8", "replace")

