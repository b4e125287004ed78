"""Which stored outputs already reached the broker.

A record's outputs are stored in the emission store before they are sent and marked sent once
the broker acknowledged them. A worker that dies between the acknowledgement and the mark
leaves the outputs stored but unmarked, and the record comes back to the partition's next
owner. Sending them again would put a second, byte-identical copy of a result on its topic
(the broker in front of us does not do transactions: the embedded one refuses
``InitProducerId``). So before sending stored outputs again, the runtime looks for them on
the broker: each output's partition (the producer's default partitioner on its key) is read
from the moment the output was stored on, and only the outputs not found there are sent.

This path runs only after a crash or a lost lease; the hot path never reads a topic. An
output counts as landed only if a record with its topic, key, value and headers is on its
own partition, as many times as the stored outputs hold it. Scans are shared: a partition
read for one record is remembered for a while (as digests), so the many records a killed
worker left behind cost one read of the partition. A scan is bounded in records, time and
memory; past a bound the output counts as missing and is sent again (at least once, never
lost). Partitions come from the producer's metadata, the view its partitioner used.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from agentfabric.errors import UnavailableError
from agentfabric.settings import Settings

from .kafka import Outgoing, make_consumer

__all__ = ["LandedCheck"]

log = logging.getLogger(__name__)

CLOCK_SLACK_MS = 5_000  # record timestamps come from the producer's clock: read a bit before
KEEP_S = 60.0  # how long a partition's scan is kept from when it started
MAX_RECORDS = 500_000  # per scan: past this the output counts as missing (sent again)
MAX_SCAN_S = 30.0
MAX_KEPT = 200_000  # digests kept per partition; a scan that would pass it is dropped

Partitions = Callable[[str], Awaitable[set[int]]]


def _digest(topic: str, key: bytes | None, value: bytes | None,
            headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (topic.encode(), key, value or b"",
                 *(b for name, v in headers for b in (name.encode(), v))):
        h.update(b"\x00" if part is None else b"\x01" + len(part).to_bytes(4, "big") + part)
    return h.digest()


def _of(out: Outgoing) -> bytes:
    return _digest(out.topic, out.key, out.value, out.headers)


@dataclass
class _Scanned:
    """What was read of one partition: from ``start`` up to ``next`` (exclusive), each
    record's digest with how often it was seen."""

    start: int
    next: int
    seen: Counter[bytes] = field(default_factory=Counter)
    created: float = field(default_factory=time.monotonic)


class LandedCheck:
    """``missing(outputs, since_ms)``: the outputs not on the broker, reading each one's
    partition from ``since_ms`` (when it was stored) on. ``partitions(topic)`` gives a
    topic's partition ids as the producer sees them."""

    def __init__(self, settings: Settings, partitions: Partitions) -> None:
        self.settings = settings
        self._partitions = partitions
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._scanned: dict[TopicPartition, _Scanned] = {}
        self._partitioner = DefaultPartitioner()

    async def close(self) -> None:
        self._scanned.clear()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def missing(self, outputs: Sequence[Outgoing], since_ms: int) -> list[Outgoing]:
        if not outputs:
            return []
        async with self._lock:  # one scan at a time: it is the rare path
            try:
                return await self._missing(outputs, since_ms)
            except (KafkaError, UnavailableError) as exc:
                log.warning("could not read back stored outputs (%s); sending them again",
                            type(exc).__name__)
                return list(outputs)

    async def _missing(self, outputs: Sequence[Outgoing], since_ms: int) -> list[Outgoing]:
        consumer = await self._started()
        self._forget_old()
        places: list[list[TopicPartition]] = [await self._partitions_of(out) for out in outputs]
        found: dict[TopicPartition, Counter[bytes]] = {}
        for tp in {tp for tps in places for tp in tps}:
            scanned = await self._scan(consumer, tp, since_ms - CLOCK_SLACK_MS)
            found[tp] = Counter(scanned.seen) if scanned is not None else Counter()
        missing = []
        for out, tps in zip(outputs, places, strict=True):
            digest = _of(out)
            where = next((tp for tp in tps if found[tp][digest] > 0), None)
            if where is None:
                missing.append(out)
            else:  # one record on the broker answers for one stored output
                found[where][digest] -= 1
        return missing

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = make_consumer(self.settings, None, client_id="agentfabric-landed")
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def _partitions_of(self, out: Outgoing) -> list[TopicPartition]:
        every = sorted(await self._partitions(out.topic))
        if not every:
            return []
        if out.key is None:  # the producer picked one at random: look in each
            return [TopicPartition(out.topic, p) for p in every]
        return [TopicPartition(out.topic, self._partitioner(out.key, every, every))]

    def _forget_old(self) -> None:
        now = time.monotonic()
        for tp in [tp for tp, s in self._scanned.items() if now - s.created > KEEP_S]:
            del self._scanned[tp]

    async def _scan(self, consumer: AIOKafkaConsumer, tp: TopicPartition,
                    since_ms: int) -> _Scanned | None:
        """Read ``tp`` from ``since_ms`` to its current end (reusing an earlier read that
        started no later); None if nothing was written there since, or the read passed a
        bound (then its outputs count as missing)."""
        consumer.assign([tp])
        found = await consumer.offsets_for_times({tp: max(0, since_ms)})
        at = found.get(tp)
        # no record at or after the time (the embedded broker answers timestamp -1)
        if at is None or at.timestamp < 0:
            return self._scanned.get(tp)
        scanned = self._scanned.get(tp)
        if scanned is None or scanned.start > at.offset:
            scanned = _Scanned(start=at.offset, next=at.offset)
            self._scanned[tp] = scanned
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, scanned.next)
        read, deadline = 0, time.monotonic() + MAX_SCAN_S
        checked_highwater, empty = False, 0
        while scanned.next < end and empty < 3:
            if (read >= MAX_RECORDS or time.monotonic() > deadline
                    or len(scanned.seen) >= MAX_KEPT):
                log.warning("%s: stopped reading back after %d records; outputs not found by "
                            "then are sent again", tp, read)
                self._scanned.pop(tp, None)
                return None
            batch = await consumer.getmany(tp, timeout_ms=500)
            if not checked_highwater and tp in batch:
                # the embedded broker may report the start of its last batch + 1 as the end
                end = max(end, consumer.highwater(tp) or 0)
                checked_highwater = True
            records = batch.get(tp, [])
            empty = 0 if records else empty + 1
            for record in records:
                scanned.seen[_digest(record.topic, record.key, record.value,
                                     list(record.headers))] += 1
                scanned.next = record.offset + 1
                read += 1
        return scanned
