"""The step-consumer runtime: one consumer-group member running one executor.

Each assigned partition has a window of records in flight (``streams.window``): records of
different runs overlap, one run's records stay in order, and a full window pauses its
partition. Every record goes through the stages of ``streams.stages``. Finished offsets are
committed every ``commit_interval_ms`` at the contiguous finished prefix, and on revocation
and stop, so a record's offset is committed only after everything it produced is
acknowledged (at-least-once). There is no barrier across partitions.

An executor that is a *sink* (it has ``execute_batch``: idempotent writes, no outputs, such
as the run ledger) takes each fetched batch of a partition at once instead: its records are
decoded and written together in order (one Redis round trip for the lot), and their offsets
finish when the write succeeds. A record that does not decode, or travelled as a claim
check, goes through the stages one by one (a bad one becomes a dead letter).

When Kafka or Redis is unavailable a record is tried again in place after a backoff; its
window fills and its partition pauses, and no commit passes it. On revocation a partition
takes nothing more and its records in flight are awaited up to ``revoke_timeout_s``, then
abandoned uncommitted; on stop the same happens to every partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from agentfabric.errors import TransientError, UnavailableError
from agentfabric.settings import Settings
from schemas.serde import header_value

from .claims import CLAIM_HEADER
from .executor import Executor, Job, Sink
from .kafka import make_consumer
from .stages import Pipeline, Stage
from .tolerant import invalid_header_keys
from .window import PartitionWindow

if TYPE_CHECKING:
    from .metrics import StreamMetrics

__all__ = ["RETRY_BACKOFF_S", "StepConsumer"]

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
WARN_EVERY_S = 5.0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: StepConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.assigned.set()


class StepConsumer:
    """Runs one executor (the router, or one workflow step) as one consumer-group member."""

    def __init__(self, settings: Settings, executor: Executor, stages: Sequence[Stage],
                 metrics: StreamMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics  # a sink's records are counted here (no stages observe them)
        self.executor = executor
        self.pipeline = Pipeline(executor, stages)
        self.windows: dict[TopicPartition, PartitionWindow] = {}
        self.assigned = asyncio.Event()
        self.processed = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._paused: set[TopicPartition] = set()
        self._releasing: set[TopicPartition] = set()
        self._commit_lock = asyncio.Lock()
        self._warned: dict[str, tuple[float, int]] = {}
        self._stop: asyncio.Event = asyncio.Event()

    @property
    def name(self) -> str:
        return self.executor.name

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        consumer = make_consumer(self.settings, self.executor.group,
                                 client_id=f"agentfabric-{self.executor.name}",
                                 fetch_max_wait_ms=getattr(self.executor, "fetch_max_wait_ms",
                                                           None))
        consumer.subscribe(topics=list(self.executor.topics), listener=_Rebalance(self))
        self._consumer = consumer
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            self._consumer = None
            raise UnavailableError(f"consumer {self.executor.name} cannot reach Kafka at "
                                   f"{self.settings.bootstrap_servers} ({type(exc).__name__})"
                                   ) from exc
        poll_ms = min(100, self.settings.commit_interval_ms)
        # one window's worth per poll: more would only wait in the backlog and pause the
        # partition, which drops what aiokafka prefetched for it
        poll_records = min(self.settings.max_poll_records, self.executor.max_in_flight)
        committer = asyncio.create_task(self._commit_every(self.settings.commit_interval_ms
                                                           / 1000))
        sink: Sink | None = getattr(self.executor, "execute_batch", None)
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=poll_ms, max_records=poll_records)
                for tp, records in batch.items():
                    if tp in self._releasing:
                        continue  # fetched before its revocation: the next owner reads it
                    if sink is not None:
                        await self._sink(self._window(tp), records, sink)
                        continue
                    self._window(tp).offer(records)
                    self._flow(tp)
        finally:
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            try:
                await self.release(list(self.windows))
            finally:
                await consumer.stop()
                self._consumer = None

    def lag(self) -> dict[TopicPartition, int]:
        """Per held partition: its last fetched highwater minus the next offset to finish
        (what is neither done nor committed); a partition not fetched yet is left out."""
        consumer = self._consumer
        if consumer is None:
            return {}
        found: dict[TopicPartition, int] = {}
        for tp in list(consumer.assignment()):
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            window = self.windows.get(tp)
            nxt = window.offsets.next_to_finish if window is not None else None
            found[tp] = max(0, highwater - (highwater if nxt is None else nxt))
        return found

    async def _commit_every(self, interval_s: float) -> None:
        """Commit in the background: the poll loop never waits for a commit."""
        while True:
            await asyncio.sleep(interval_s)
            await self.commit()

    def _window(self, tp: TopicPartition) -> PartitionWindow:
        window = self.windows.get(tp)
        if window is None:
            window = PartitionWindow(self.executor.max_in_flight, self._work,
                                     on_change=lambda: self._flow(tp),
                                     backlog=self.executor.max_in_flight)
            self.windows[tp] = window
        return window

    def _flow(self, tp: TopicPartition) -> None:
        """Pause a partition whose window is full; resume it once there is room."""
        consumer, window = self._consumer, self.windows.get(tp)
        if consumer is None or window is None or window.closed:
            return
        try:
            if window.full and tp not in self._paused:
                consumer.pause(tp)
                self._paused.add(tp)
            elif not window.full and tp in self._paused:
                consumer.resume(tp)
                self._paused.discard(tp)
        except (KafkaError, AssertionError, KeyError):  # unassigned meanwhile
            self._paused.discard(tp)

    async def _sink(self, window: PartitionWindow, records: list[ConsumerRecord],
                    sink: Sink) -> None:
        """A sink's batch of one partition: decoded and written at once, in order."""
        taken: list[tuple[ConsumerRecord, Job]] = []
        for record in records:
            window.offsets.start(record.offset)
            job = self._sink_job(record)
            if job is None:  # the stages deal with it (a dead letter, a claim check)
                if await self._work(record, window):
                    window.offsets.finish(record.offset)
                continue
            taken.append((record, job))
        failures = 0
        while taken:
            try:
                await sink([job for _, job in taken])
            except (TransientError, UnavailableError) as exc:
                if window.closed or self._stop.is_set():
                    return  # left unfinished: the partition's next reader writes them
                delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
                failures += 1
                self._warn(exc.reason, taken[0][0], delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            break
        for record, _ in taken:
            window.offsets.finish(record.offset)
        self.processed += len(taken)
        if self.metrics is not None and taken:
            self.metrics.records_in.labels(self.name, self.metrics.topic_kind(
                taken[0][0].topic)).inc(len(taken))

    def _sink_job(self, record: ConsumerRecord) -> Job | None:
        """The record as a job, or None if the stages must take it one by one."""
        if header_value(record.headers, CLAIM_HEADER) is not None or \
                invalid_header_keys(record.headers):
            return None
        try:
            return self.executor.decode(record)
        except Exception:  # noqa: BLE001 - the stages turn it into a dead letter
            return None

    async def _work(self, record: ConsumerRecord, window: PartitionWindow) -> bool:
        """One record through the stages; True once its output is acknowledged."""
        failures = 0
        while True:
            try:
                await self.pipeline.run(record)
            except (TransientError, UnavailableError) as exc:
                problem = exc.reason
            except Exception as exc:
                log.exception("%s: unexpected failure on %s[%d]@%d", self.executor.name,
                              record.topic, record.partition, record.offset)
                problem = f"{type(exc).__name__}: {exc}"
            else:
                self.processed += 1
                return True
            if window.closed or self._stop.is_set():
                return False
            delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
            failures += 1
            self._warn(problem, record, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def _warn(self, problem: str, record: ConsumerRecord, delay: float) -> None:
        """Log a retried failure; the same problem at most once per WARN_EVERY_S per
        consumer (a Redis outage would otherwise log once per record per try)."""
        now = time.monotonic()
        last, quiet = self._warned.get(problem, (0.0, 0))
        if now - last < WARN_EVERY_S:
            self._warned[problem] = (last, quiet + 1)
            return
        more = f" ({quiet} more records hit this since the last line)" if quiet else ""
        log.warning("%s: %s; trying %s[%d]@%d again in %.1fs%s", self.executor.name, problem,
                    record.topic, record.partition, record.offset, delay, more)
        self._warned[problem] = (now, 0)
        if len(self._warned) > 100:  # distinct problems: keep the memory bounded
            self._warned = {problem: self._warned[problem]}

    async def commit(self, only: Sequence[TopicPartition] | None = None) -> None:
        async with self._commit_lock:
            await self._commit(only)

    async def _commit(self, only: Sequence[TopicPartition] | None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        chosen = self.windows if only is None else {tp: self.windows[tp] for tp in only
                                                    if tp in self.windows}
        positions = {tp: pos for tp, window in chosen.items()
                     if (pos := window.offsets.to_commit()) is not None}
        if not positions:
            return
        try:
            await consumer.commit({tp: OffsetAndMetadata(pos, "") for tp, pos in positions.items()})
        except KafkaError as exc:
            # The records stay uncommitted and come back; idempotent steps absorb them.
            log.warning("commit failed for %s (%s); records will be redelivered",
                        self.executor.name, type(exc).__name__)
            return
        for tp, pos in positions.items():
            window = self.windows.get(tp)  # a rebalance may have dropped it meanwhile
            if window is not None:
                window.offsets.committed(pos)

    async def release(self, partitions: Sequence[TopicPartition]) -> None:
        """Stop taking records of ``partitions``, await their records in flight up to the
        bound, commit what finished, and forget them."""
        windows = [(tp, self.windows[tp]) for tp in partitions if tp in self.windows]
        if not windows:
            return
        self._releasing.update(tp for tp, _ in windows)
        try:
            await self._release(windows)
        finally:
            self._releasing.difference_update(tp for tp, _ in windows)

    async def _release(self, windows: list[tuple[TopicPartition, PartitionWindow]]) -> None:
        abandoned = await asyncio.gather(*(w.close(self.settings.revoke_timeout_s)
                                           for _, w in windows))
        if any(abandoned):
            log.warning("%s: %d records still in flight after %.1fs were abandoned "
                        "uncommitted; the partition's next owner runs them",
                        self.executor.name, sum(abandoned), self.settings.revoke_timeout_s)
        await self.commit([tp for tp, _ in windows])
        for tp, _ in windows:
            self.windows.pop(tp, None)
            self._paused.discard(tp)
