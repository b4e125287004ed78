"""Kafka helpers of the suite: preload, paced sending, counting and reading topics back.

Figures are computed from record timestamps: the producer client stamps each record when it is
sent (CreateTime; the embedded broker keeps it), so a result's timestamp is when the worker
produced it. Reading topics back after the fact means no sink competes for CPU while a case runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.models import TriggerEvent
from schemas.serde import encode

__all__ = ["Counter", "paced_send", "preload", "read_all", "trigger", "wait_for_count"]

CHUNK = 2000


def trigger(event_id: str, n: int, *, source: str = "bench", event_type: str = "ping",
            ) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """An Avro trigger event as (key, value, headers), keyed by its event id."""
    value, headers = encode(TriggerEvent(event_id=event_id, source=source,
                                         event_type=event_type, payload={"n": n}))
    return event_id.encode(), value, [(k, v) for k, v in headers]


def producer(bootstrap: str) -> AIOKafkaProducer:
    """A producer with the fabric's settings (acks=all, no idempotence, no linger)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
                            linger_ms=0, max_batch_size=256 * 1024)


async def preload(bootstrap: str, topic: str, count: int,
                  make: Callable[[int], tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> float:
    """Produce ``count`` messages made by ``make(i)``, all acknowledged; seconds it took."""
    started = time.perf_counter()
    prod = producer(bootstrap)
    await prod.start()
    try:
        for first in range(0, count, CHUNK):
            acks = []
            for i in range(first, min(first + CHUNK, count)):
                key, value, headers = make(i)
                acks.append(await prod.send(topic, value, key=key, headers=headers))
            await asyncio.gather(*acks)
    finally:
        await prod.stop()
    return time.perf_counter() - started


async def paced_send(bootstrap: str, topic: str, rate: float, seconds: float,
                     make: Callable[[int], tuple[bytes, bytes, list[tuple[str, bytes]]]],
                     start: int = 0) -> int:
    """Send at ``rate`` messages/s for ``seconds`` on an absolute schedule (no drift); count."""
    total = int(rate * seconds)
    prod = producer(bootstrap)
    await prod.start()
    acks: list[asyncio.Future[Any]] = []
    try:
        begin = time.perf_counter()
        for i in range(total):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            key, value, headers = make(start + i)
            acks.append(await prod.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*acks)
    finally:
        await prod.stop()
    return total


async def partitions_of(bootstrap: str, topic: str) -> list[TopicPartition]:
    """The partitions of ``topic`` (it must exist), from the cluster metadata."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    await admin.start()
    try:
        for _ in range(50):
            for described in await admin.describe_topics([topic]):
                numbers = sorted(p["partition"] for p in described.get("partitions", []))
                if described.get("error_code", 0) == 0 and numbers:
                    return [TopicPartition(topic, n) for n in numbers]
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    raise RuntimeError(f"topic {topic} has no partitions (was it created?)")


class Counter:
    """Counts the messages on a topic with one long-lived consumer.

    The embedded broker answers ListOffsets(latest) with the base offset of the last record
    batch + 1, not the offset after the last record, so ``end_offsets`` undercounts. Fetch
    responses carry the right high watermark, so ``count`` seeks to just before that reported
    end, fetches one batch and reads the consumer's ``highwater`` (correct on any broker).
    """

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self._partitions: dict[str, list[TopicPartition]] = {}
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                          enable_auto_commit=False, fetch_max_wait_ms=10,
                                          max_partition_fetch_bytes=64 * 1024)

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def partitions(self, topic: str) -> list[TopicPartition]:
        if topic not in self._partitions:
            self._partitions[topic] = await partitions_of(self._bootstrap, topic)
        return self._partitions[topic]

    async def count(self, topic: str) -> int:
        parts = await self.partitions(topic)
        consumer = self._consumer
        if set(consumer.assignment()) != set(parts):
            consumer.assign(parts)
        reported = await consumer.end_offsets(parts)
        total = 0
        for tp in parts:
            if reported[tp] == 0:
                continue
            consumer.seek(tp, reported[tp] - 1)
            highwater = None
            for _ in range(100):
                await consumer.getmany(tp, timeout_ms=50, max_records=1)
                highwater = consumer.highwater(tp)
                if highwater is not None and highwater >= reported[tp]:
                    break
            total += reported[tp] if highwater is None else max(highwater, reported[tp])
        return total


async def wait_for_count(counter: Counter, topic: str, target: int, cap_s: float,
                         alive: Callable[[], bool], *, poll_s: float = 0.25,
                         on_tick: Callable[[int], None] | None = None) -> tuple[int, bool]:
    """Poll ``topic`` until it holds ``target`` messages or ``cap_s`` passed; (count, capped).

    Stops early (raising) if ``alive()`` turns false: the process under test died.
    """
    deadline = time.monotonic() + cap_s
    count = 0
    while True:
        count = await counter.count(topic)
        if count >= target:
            return count, False
        if time.monotonic() >= deadline:
            return count, True
        if not alive():
            raise RuntimeError(f"the process under test exited while {topic} held {count} of "
                               f"{target} messages")
        if on_tick is not None:
            on_tick(count)
        await asyncio.sleep(poll_s)


async def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record on ``topic`` now (all partitions, from the beginning), in partition order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=10,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    try:
        parts = await partitions_of(bootstrap, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list[Any] = []
        remaining = set(parts)
        idle = 0
        while remaining and idle < 40:  # 20 s without any record: give up, return what was read
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=10_000)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                out.extend(records)
            for tp in list(remaining):
                highwater = consumer.highwater(tp)
                if highwater is not None and await consumer.position(tp) >= highwater:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()
