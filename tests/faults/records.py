"""Reading what the fabric wrote: a topic followed in the background, snapshots that see
every record, the check that every run has one result, consumer lag, paced publishing."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer import AIOKafkaConsumer
from redis.asyncio import Redis

from agentfabric.app import publish_events
from agentfabric.settings import Settings
from schemas.models import DeadLetter, RunResult, TriggerEvent
from schemas.serde import decode, header_value
from streams.claims import CLAIM_HEADER
from streams.reader import read_topic
from streams.topics import TopicNames

from .harness import WORKFLOW

__all__ = ["Follower", "Outcome", "dead_letters_of", "dump", "lag", "one_result_each",
           "publish_paced", "read_all", "results_of", "snapshot"]


class Follower:
    """Follows a topic in the background, decoding each record as ``model``."""

    def __init__(self, settings: Settings, topic: str, model: type[Any]) -> None:
        self.settings, self.topic, self.model = settings, topic, model
        self.found: list[Any] = []
        self.changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Follower:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _follow(self) -> None:
        async for record in read_topic(self.settings, self.topic, follow=True,
                                       stop=self._stop):
            self.found.append(decode(record.value, record.headers, self.model))
            self.changed.set()

    async def until(self, enough: Callable[[list[Any]], bool], within: float,
                    check: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + within
        while not enough(self.found):
            if self._task is not None and self._task.done():
                self._task.result()
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.topic}: condition not met in {within}s "
                                     f"({len(self.found)} records)")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))


async def snapshot(settings: Settings, topic: str, within: float = 60,
                   ) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on ``topic`` now, claim checks put back. Not ``streams.reader.read_topic``:
    that stops at ``end_offsets``, which the embedded broker reports as the base offset of a
    partition's last batch + 1, so it can miss the tail of a partition. This reads until the
    position reaches the high watermark of the fetch responses (right on any broker)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=10,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    redis = Redis.from_url(settings.redis_url)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p)
               for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert tps, f"no topic {topic}"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: list[ConsumerRecord[bytes, bytes]] = []
        remaining = set(tps)
        async with asyncio.timeout(within):
            while remaining:
                batches = await consumer.getmany(*remaining, timeout_ms=200,
                                                 max_records=10_000)
                for records in batches.values():
                    found.extend(records)
                for tp in list(remaining):
                    highwater = consumer.highwater(tp)
                    if highwater is not None and await consumer.position(tp) >= highwater:
                        remaining.discard(tp)
        out = []
        for record in found:
            ref = header_value(record.headers, CLAIM_HEADER)
            if ref is not None:
                value = await redis.get(f"{settings.topic_prefix}:claim:{ref.decode()}")
                assert value is not None, f"claim check {ref!r} is gone"
                record = dataclasses.replace(record, value=value, headers=tuple(
                    (k, v) for k, v in record.headers if k != CLAIM_HEADER))
            out.append(record)
        return out
    finally:
        await consumer.stop()
        await redis.aclose()


async def read_all(settings: Settings, topic: str, model: type[Any]) -> list[Any]:
    return [decode(r.value, r.headers, model) for r in await snapshot(settings, topic)]


async def results_of(settings: Settings, workflow: str = WORKFLOW) -> list[RunResult]:
    return await read_all(settings, TopicNames(settings.topic_prefix).results(workflow),
                          RunResult)


async def dead_letters_of(settings: Settings) -> list[DeadLetter]:
    return await read_all(settings, TopicNames(settings.topic_prefix).dlq, DeadLetter)


async def lag(settings: Settings, group: str, topic: str) -> int:
    """Records on ``topic`` that ``group`` has not committed yet (the ends from the records
    themselves: the embedded broker's ``end_offsets`` undercounts)."""
    ends: dict[TopicPartition, int] = {}
    for record in await snapshot(settings, topic):
        tp = TopicPartition(topic, record.partition)
        ends[tp] = max(ends.get(tp, 0), record.offset + 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=list(ends))
    finally:
        await admin.close()
    total = 0
    for tp, end in ends.items():
        entry = committed.get(tp)
        done = entry.offset if entry is not None and entry.offset >= 0 else 0
        total += max(0, end - done)
    return total


async def publish_paced(settings: Settings, events: list[TriggerEvent], batch: int,
                        every_s: float, source: str = "erp") -> None:
    """Publish ``events`` in batches, one batch each ``every_s`` (a flow, not a burst)."""
    topic = TopicNames(settings.topic_prefix).trigger(source)
    for i in range(0, len(events), batch):
        started = time.monotonic()
        await publish_events(settings, topic, events[i:i + batch])
        await asyncio.sleep(max(0.0, every_s - (time.monotonic() - started)))


@dataclass
class Outcome:
    """The result records of a test's runs, checked: one result per run."""

    results: dict[str, RunResult]  # run id -> its result
    records: int  # result records on the topic
    copies: list[dict[str, Any]]  # runs with more than one (byte-identical) record

    def copies_outside(self, kills_ms: Iterable[int], window_ms: int) -> list[dict[str, Any]]:
        """Copies whose first record was not written within ``window_ms`` before a kill
        (a re-sent stored output can only come from a worker that died before it marked
        the output acknowledged)."""
        kills = list(kills_ms)
        return [c for c in self.copies
                if not any(0 <= k - c["first_ms"] <= window_ms for k in kills)]


async def one_result_each(settings: Settings, expected: dict[str, str],
                          workflow: str = WORKFLOW) -> Outcome:
    """Every expected run has a result and nothing else is there; a run with more than one
    result record has byte-identical ones (the same output re-sent), never two outcomes."""
    records = await snapshot(settings, TopicNames(settings.topic_prefix).results(workflow))
    by_run: dict[str, list[ConsumerRecord[bytes, bytes]]] = {}
    for record in records:
        by_run.setdefault((record.key or b"").decode(), []).append(record)
    missing = [expected[r] for r in expected if r not in by_run]
    strangers = [r for r in by_run if r not in expected]
    forked = {expected.get(r, r): len(rs) for r, rs in by_run.items()
              if len({x.value for x in rs}) > 1}
    assert not missing, f"{len(missing)} runs without a result: {missing[:10]}"
    assert not strangers, f"results of unknown runs: {strangers[:5]}"
    assert not forked, f"{len(forked)} runs with different results: {list(forked.items())[:10]}"
    copies = [{"run": r, "invoice": expected[r], "records": len(rs),
               "first_ms": min(x.timestamp for x in rs),
               "at": [(x.partition, x.offset, x.timestamp) for x in rs]}
              for r, rs in by_run.items() if len(rs) > 1]
    results = {r: decode(rs[0].value, rs[0].headers, RunResult) for r, rs in by_run.items()}
    return Outcome(results, len(records), copies)


def dump(folder: Path, name: str, data: Any) -> Path:
    """Write figures a test measured as JSON beside its logs (for a post-mortem)."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path
