"""Which stored outputs already reached the broker.

A record's outputs are stored in the emission store before they are sent and marked sent once
the broker acknowledged them. A worker that dies between the acknowledgement and the mark
leaves the outputs stored but unmarked, and the record comes back to the partition's next
owner. Sending them again would put a second, byte-identical copy of a result on its topic
(the broker in front of us does not do transactions: the embedded one refuses
``InitProducerId``). So before sending stored outputs again, the runtime looks for them on
the broker: each output's partition (the producer's default partitioner on its key) is read
from the moment the output was stored on, and only the outputs not found there are sent.

This path runs only after a crash or a lost lease; the hot path never reads a topic. Scans
are shared: a partition read for one record is remembered for a while (as digests of key
and value), so the many records a killed worker left behind cost one read of the partition.
A scan is bounded in records and time; past the bound the output counts as missing and is
sent again (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from agentfabric.settings import Settings

from .kafka import Outgoing, make_consumer

__all__ = ["LandedCheck"]

log = logging.getLogger(__name__)

CLOCK_SLACK_MS = 5_000  # record timestamps come from the producer's clock: read a bit before
KEEP_S = 60.0  # how long a partition's scan is remembered
MAX_RECORDS = 500_000  # per scan: past this the output counts as missing (sent again)
MAX_SCAN_S = 30.0


def _digest(key: bytes | None, value: bytes | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\x00" if key is None else b"\x01" + len(key).to_bytes(4, "big") + key)
    h.update(value or b"")
    return h.digest()


@dataclass
class _Scanned:
    """What was read of one partition: from ``start`` up to ``next`` (exclusive)."""

    start: int
    next: int
    seen: set[bytes] = field(default_factory=set)
    used: float = field(default_factory=time.monotonic)


class LandedCheck:
    """``missing(outputs, since_ms)``: the outputs not on the broker, reading each one's
    partition from ``since_ms`` (when it was stored) on."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._scanned: dict[TopicPartition, _Scanned] = {}
        self._partitioner = DefaultPartitioner()

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def missing(self, outputs: Sequence[Outgoing], since_ms: int) -> list[Outgoing]:
        if not outputs:
            return []
        async with self._lock:  # one scan at a time: it is the rare path
            try:
                return await self._missing(outputs, since_ms)
            except KafkaError as exc:
                log.warning("could not read back stored outputs (%s); sending them again",
                            type(exc).__name__)
                return list(outputs)

    async def _missing(self, outputs: Sequence[Outgoing], since_ms: int) -> list[Outgoing]:
        consumer = await self._started()
        self._forget_old()
        wanted: dict[TopicPartition, list[Outgoing]] = {}
        for out in outputs:
            for tp in await self._partitions_of(consumer, out):
                wanted.setdefault(tp, []).append(out)
        found: set[bytes] = set()
        for tp in wanted:
            scanned = await self._scan(consumer, tp, since_ms - CLOCK_SLACK_MS)
            if scanned is not None:
                found |= scanned.seen
        return [out for out in outputs if _digest(out.key, out.value) not in found]

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = make_consumer(self.settings, None, client_id="agentfabric-landed")
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def _partitions_of(self, consumer: AIOKafkaConsumer,
                             out: Outgoing) -> list[TopicPartition]:
        partitions = consumer.partitions_for_topic(out.topic)
        if not partitions:
            await consumer.topics()  # refresh metadata once
            partitions = consumer.partitions_for_topic(out.topic) or set()
        every = sorted(partitions)
        if not every:
            return []
        if out.key is None:  # the producer picked one at random: look in each
            return [TopicPartition(out.topic, p) for p in every]
        return [TopicPartition(out.topic, self._partitioner(out.key, every, every))]

    def _forget_old(self) -> None:
        now = time.monotonic()
        for tp in [tp for tp, s in self._scanned.items() if now - s.used > KEEP_S]:
            del self._scanned[tp]

    async def _scan(self, consumer: AIOKafkaConsumer, tp: TopicPartition,
                    since_ms: int) -> _Scanned | None:
        """Read ``tp`` from ``since_ms`` to its current end (reusing an earlier read that
        started no later); None if nothing was written there since."""
        found = await consumer.offsets_for_times({tp: max(0, since_ms)})
        at = found.get(tp)
        # no record at or after the time (the embedded broker answers timestamp -1)
        if at is None or at.timestamp < 0:
            return self._scanned.get(tp)
        scanned = self._scanned.get(tp)
        if scanned is None or scanned.start > at.offset:
            scanned = _Scanned(start=at.offset, next=at.offset)
            self._scanned[tp] = scanned
        scanned.used = time.monotonic()
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.assign([tp])
        consumer.seek(tp, scanned.next)
        read, deadline = 0, time.monotonic() + MAX_SCAN_S
        checked_highwater, empty = False, 0
        while scanned.next < end and empty < 3:
            if read >= MAX_RECORDS or time.monotonic() > deadline:
                log.warning("%s: stopped reading back after %d records; outputs not found by "
                            "then are sent again", tp, read)
                break
            batch = await consumer.getmany(tp, timeout_ms=500)
            if not checked_highwater and tp in batch:
                # the embedded broker may report the start of its last batch + 1 as the end
                end = max(end, consumer.highwater(tp) or 0)
                checked_highwater = True
            records = batch.get(tp, [])
            empty = 0 if records else empty + 1
            for record in records:
                scanned.seen.add(_digest(record.key, record.value))
                scanned.next = record.offset + 1
                read += 1
        return scanned
