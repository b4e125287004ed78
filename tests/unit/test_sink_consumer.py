"""A sink executor (``execute_batch``) takes each fetched batch of a partition at once: the
jobs are written together in offset order, a record that does not decode goes through the
stages one by one, Redis being down retries the batch in place, and offsets finish only
once the batch is written."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from agentfabric.errors import DecodeError, UnavailableError
from agentfabric.settings import Settings
from streams.consumer import StepConsumer
from streams.executor import Emit, Job
from streams.stages import Next, Pass

pytestmark = pytest.mark.timeout(20)

TP = TopicPartition("af.run-events", 0)


def record(offset: int, value: bytes = b"ok") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=TP.topic, partition=0, offset=offset, timestamp=0,
                          timestamp_type=0, key=b"k", value=value, checksum=None,
                          serialized_key_size=1, serialized_value_size=len(value), headers=())


class Ledger:
    """A sink: ``decode`` refuses the value ``bad``; ``execute_batch`` notes each batch and
    fails while ``down`` is above zero."""

    name = "ledger"
    group = "af.ledger"
    topics = ("af.run-events",)
    dlq_topic = "af.dlq"
    max_in_flight = 8

    def __init__(self, down: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.down = down

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> Job:
        if rec.value == b"bad":
            raise DecodeError("not a run event")
        return Job(message=None, dedupe_key=None, timeout_s=5,  # type: ignore[arg-type]
                   first_failure_ms=rec.offset)

    async def execute(self, job: Job) -> Sequence[Emit]:
        raise AssertionError("a sink's records are written in batches")

    async def execute_batch(self, jobs: Sequence[Job]) -> None:
        if self.down > 0:
            self.down -= 1
            raise UnavailableError("Redis is unavailable")
        self.batches.append([job.first_failure_ms or 0 for job in jobs])

    def retry(self, job: Job, error: Exception) -> Emit | None:
        return None


class OneByOne:
    """The stages, for the records the sink leaves to them: notes each offset."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def __call__(self, work: Pass, after: Next) -> None:
        self.seen.append(work.record.offset)


def consumer(ledger: Ledger, stages: OneByOne) -> StepConsumer:
    return StepConsumer(Settings(), ledger, [stages])


async def test_a_batch_is_written_at_once_and_a_bad_record_goes_through_the_stages() -> None:
    ledger, stages = Ledger(), OneByOne()
    c = consumer(ledger, stages)
    window = c._window(TP)
    await c._sink(window, [record(0), record(1), record(2, b"bad"), record(3)],
                  ledger.execute_batch)
    assert ledger.batches == [[0, 1, 3]]
    assert stages.seen == [2]
    assert window.offsets.to_commit() == 4
    assert c.processed == 4


async def test_a_batch_is_tried_again_while_redis_is_down() -> None:
    ledger, stages = Ledger(down=1), OneByOne()
    c = consumer(ledger, stages)
    window = c._window(TP)
    await asyncio.wait_for(c._sink(window, [record(5), record(6)], ledger.execute_batch), 5)
    assert ledger.batches == [[5, 6]]
    assert window.offsets.to_commit() == 7


async def test_a_batch_not_written_by_the_stop_is_left_uncommitted() -> None:
    ledger, stages = Ledger(down=100), OneByOne()
    c = consumer(ledger, stages)
    c._stop.set()
    window = c._window(TP)
    await asyncio.wait_for(c._sink(window, [record(8), record(9)], ledger.execute_batch), 5)
    assert ledger.batches == []
    assert window.offsets.to_commit() is None
