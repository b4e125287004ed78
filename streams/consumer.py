"""The step-consumer runtime: consume, handle, produce, wait for the broker's ack, and only
then mark the input offset finished; commit the contiguous finished prefix.

Guarantees: a record's offset is committed only after everything it produced is
acknowledged (at-least-once); a record that fails permanently becomes a dead letter and
the consumer goes on; an infrastructure failure (Redis or Kafka down) rewinds the
partition to that record and retries it after a backoff, without committing past it.
On stop, the record in progress finishes, finished offsets are committed, and the
rest is left for the next owner of the partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from agentfabric.errors import PermanentError, TransientError
from agentfabric.settings import Settings

from .dlq import dead_letter
from .handlers import Handled, Handler
from .idempotency import EmissionStore
from .kafka import Producer, make_consumer
from .offsets import PartitionOffsets

__all__ = ["StepConsumer"]

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: StepConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.owner.revoked.update(revoked)  # the batch loop stops before its next record
        await self.owner.commit(only=set(revoked))
        for tp in revoked:
            self.owner.offsets.pop(tp, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner.revoked.difference_update(assigned)
        self.owner.assigned.set()


class StepConsumer:
    """Runs one handler (the router, or one workflow step) as one consumer-group member."""

    def __init__(self, settings: Settings, handler: Handler, producer: Producer,
                 store: EmissionStore) -> None:
        self.settings = settings
        self.handler = handler
        self.producer = producer
        self.store = store
        self.offsets: dict[TopicPartition, PartitionOffsets] = {}
        self.revoked: set[TopicPartition] = set()
        self.assigned = asyncio.Event()
        self.processed = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        consumer = make_consumer(self.settings, self.handler.group,
                                 client_id=f"agentfabric-{self.handler.name}")
        consumer.subscribe(topics=self.handler.topics, listener=_Rebalance(self))
        self._consumer = consumer
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise TransientError(f"consumer {self.handler.name} cannot reach Kafka at "
                                 f"{self.settings.bootstrap_servers} ({type(exc).__name__})"
                                 ) from exc
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                if batch:
                    await asyncio.gather(*(self._partition(tp, records, stop)
                                           for tp, records in batch.items()))
                    await self.commit()
        finally:
            try:
                await self.commit()
            finally:
                await consumer.stop()
                self._consumer = None

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        positions = {tp: pos for tp, tracker in self.offsets.items()
                     if (only is None or tp in only) and (pos := tracker.to_commit()) is not None}
        if not positions:
            return
        try:
            await consumer.commit({tp: OffsetAndMetadata(pos, "") for tp, pos in positions.items()})
        except KafkaError as exc:
            # The records stay uncommitted and come back; idempotent steps absorb them.
            log.warning("commit failed for %s (%s); records will be redelivered",
                        self.handler.name, type(exc).__name__)
            return
        for tp, pos in positions.items():
            tracker = self.offsets.get(tp)  # a rebalance may have dropped it meanwhile
            if tracker is not None:
                tracker.committed(pos)

    async def _partition(self, tp: TopicPartition, records: list[ConsumerRecord],
                         stop: asyncio.Event) -> None:
        tracker = self.offsets.setdefault(tp, PartitionOffsets())
        for record in records:
            if stop.is_set() or tp in self.revoked:
                return
            tracker.start(record.offset)
            try:
                await self._process(record)
            except TransientError as exc:
                tracker.abandon_from(record.offset)
                await self._rewind(tp, record, exc, stop)
                return
            tracker.finish(record.offset)
            self.processed += 1
            self._failures = 0

    async def _process(self, record: ConsumerRecord) -> None:
        try:
            handled = await self.handler.handle(record)
        except TransientError:
            raise
        except Exception as exc:  # never crash the consumer: the record becomes a dead letter
            log.exception("handler %s failed on %s[%d]@%d", self.handler.name, record.topic,
                          record.partition, record.offset)
            handled = Handled([dead_letter(record, exc, group=self.handler.group,
                                           dlq_topic=self.handler.names.dlq)])
        try:
            await self.producer.send_all(handled.messages)
        except PermanentError as exc:  # e.g. an output too large for the broker
            log.error("%s: %s; dead-lettering %s[%d]@%d", self.handler.name, exc.reason,
                      record.topic, record.partition, record.offset)
            await self.producer.send_all([dead_letter(record, exc, group=self.handler.group,
                                                      dlq_topic=self.handler.names.dlq)])
            return
        if handled.ack_key is not None:
            await self.store.acknowledge(handled.ack_key)

    async def _rewind(self, tp: TopicPartition, record: ConsumerRecord, exc: TransientError,
                      stop: asyncio.Event) -> None:
        delay = RETRY_BACKOFF_S[min(self._failures, len(RETRY_BACKOFF_S) - 1)]
        self._failures += 1
        log.warning("%s: %s; retrying %s[%d]@%d in %.1fs", self.handler.name, exc.reason,
                    record.topic, record.partition, record.offset, delay)
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, AssertionError):
                self._consumer.seek(tp, record.offset)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
