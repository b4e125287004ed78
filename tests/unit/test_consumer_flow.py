"""StepConsumer's flow control without a broker: a fake aiokafka consumer records pause,
resume and commit; a stage the test controls stands in for the pipeline. Full windows pause
their partition and drained ones resume it, other partitions keep going, commits cover the
contiguous finished prefix, Kafka or Redis being down retries the record in place, and a
release abandons what outlives its bound without committing past it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from agentfabric.errors import UnavailableError
from agentfabric.settings import Settings
from streams.consumer import RETRY_BACKOFF_S, StepConsumer
from streams.executor import Emit, Job
from streams.stages import Next, Pass
from streams.window import PartitionWindow

pytestmark = pytest.mark.timeout(20)

WAIT_S = 5.0
TP = TopicPartition("af.wf.work", 0)
TP2 = TopicPartition("af.wf.work", 1)


def record(tp: TopicPartition, offset: int, key: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=tp.topic, partition=tp.partition, offset=offset, timestamp=0,
                          timestamp_type=0, key=key, value=b"v", checksum=None,
                          serialized_key_size=1, serialized_value_size=1, headers=())


class FakeExecutor:
    name = "wf.work"
    group = "af.wf.work"
    topics = ("af.wf.work",)
    dlq_topic = "af.dlq"

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> Job:
        raise AssertionError("not used: the test's stage replaces the pipeline")

    async def execute(self, job: Job) -> Sequence[Emit]:
        raise AssertionError("not used")

    def retry(self, job: Job, error: Exception) -> Emit | None:
        raise AssertionError("not used")


class FakeKafka:
    """The calls StepConsumer makes on its aiokafka consumer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def pause(self, *tps: TopicPartition) -> None:
        self.calls.extend(("pause", tp) for tp in tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.calls.extend(("resume", tp) for tp in tps)

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.calls.append(("commit", {tp: meta.offset for tp, meta in offsets.items()}))

    def flow(self, tp: TopicPartition) -> list[str]:
        return [what for what, arg in self.calls if arg == tp and what in ("pause", "resume")]

    def commits(self) -> list[object]:
        return [arg for what, arg in self.calls if what == "commit"]


class Gate:
    """The one stage: each (partition, offset) waits for the test to ``finish`` or ``fail``
    it; every attempt and every end is signalled."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[int, int], asyncio.Queue[Exception | None]] = {}
        self.attempts: dict[tuple[int, int], int] = {}
        self.running: set[tuple[int, int]] = set()
        self.signal = asyncio.Event()

    def _queue(self, where: tuple[int, int]) -> asyncio.Queue[Exception | None]:
        return self.outcomes.setdefault(where, asyncio.Queue())

    async def __call__(self, work: Pass, after: Next) -> None:
        where = (work.record.partition, work.record.offset)
        self.attempts[where] = self.attempts.get(where, 0) + 1
        self.running.add(where)
        self.signal.set()
        try:
            outcome = await self._queue(where).get()
        finally:
            self.running.discard(where)
            self.signal.set()
        if outcome is not None:
            raise outcome

    def finish(self, partition: int, offset: int) -> None:
        self._queue((partition, offset)).put_nowait(None)

    def fail(self, partition: int, offset: int, error: Exception) -> None:
        self._queue((partition, offset)).put_nowait(error)

    async def until(self, holds: Callable[[], bool], what: str) -> None:
        async def wait() -> None:
            while not holds():
                self.signal.clear()
                await self.signal.wait()
        try:
            await asyncio.wait_for(wait(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for: {what}") from None


class Flow:
    def __init__(self, max_in_flight: int, **settings: object) -> None:
        self.gate = Gate()
        self.kafka = FakeKafka()
        self.consumer = StepConsumer(Settings(**settings),  # type: ignore[arg-type]
                                     FakeExecutor(max_in_flight), [self.gate])
        self.consumer._consumer = self.kafka
        flow = self.consumer._flow

        def flow_and_signal(tp: TopicPartition) -> None:  # a window changed: look again
            flow(tp)
            self.gate.signal.set()
        self.consumer._flow = flow_and_signal  # type: ignore[method-assign]

    def fetched(self, tp: TopicPartition, keys: Sequence[bytes], first: int = 0) -> None:
        """What ``StepConsumer.run`` does with one partition's fetched records."""
        self.consumer._window(tp).offer([record(tp, first + i, k) for i, k in enumerate(keys)])
        self.consumer._flow(tp)

    def window_of(self, tp: TopicPartition) -> PartitionWindow:
        return self.consumer.windows[tp]


@pytest.fixture
async def flow() -> AsyncIterator[Callable[..., Flow]]:
    made: list[Flow] = []

    def make(max_in_flight: int, **settings: object) -> Flow:
        made.append(Flow(max_in_flight, **settings))
        return made[-1]
    try:
        yield make
    finally:  # let every record end, then release everything: no task outlives the test
        for f in made:
            f.consumer._stop.set()
            for where in list(f.gate.running):
                f.gate.finish(*where)
            await f.consumer.release(list(f.consumer.windows))


async def test_a_full_window_pauses_its_partition_until_it_drains(
        flow: Callable[..., Flow]) -> None:
    f = flow(2)  # two in flight and a backlog of two ready to start
    f.fetched(TP, [b"a", b"b", b"c", b"d"])
    await f.gate.until(lambda: f.gate.running == {(0, 0), (0, 1)}, "two running")
    assert f.window_of(TP).waiting == 2
    assert f.kafka.flow(TP) == ["pause"], "window and backlog full: fetch no more"

    f.gate.finish(0, 0)
    await f.gate.until(lambda: (0, 2) in f.gate.running, "offset 2 from the backlog")
    await f.gate.until(lambda: f.kafka.flow(TP) == ["pause", "resume"],
                       "resumed once the backlog has room")
    f.gate.finish(0, 1)
    await f.gate.until(lambda: (0, 3) in f.gate.running, "offset 3 from the backlog")
    assert f.kafka.flow(TP) == ["pause", "resume"], "paused again with room in the backlog"

    f.gate.finish(0, 2)
    await f.gate.until(lambda: f.window_of(TP).in_flight == 1, "offset 2 finished")

    await f.consumer.commit()
    assert f.kafka.commits() == [{TP: 3}]
    await f.consumer.commit()
    assert f.kafka.commits() == [{TP: 3}], "the same position was committed twice"

    f.gate.finish(0, 3)
    await f.gate.until(lambda: f.window_of(TP).in_flight == 0, "all finished")
    await f.consumer.commit()
    assert f.kafka.commits() == [{TP: 3}, {TP: 4}]
    assert f.consumer.processed == 4


async def test_a_paused_partition_does_not_hold_up_another(flow: Callable[..., Flow]) -> None:
    f = flow(1)
    f.fetched(TP, [b"a", b"b"])
    await f.gate.until(lambda: f.gate.running == {(0, 0)}, "partition 0 stuck on offset 0")
    assert f.kafka.flow(TP) == ["pause"]

    f.fetched(TP2, [b"x"])
    await f.gate.until(lambda: (1, 0) in f.gate.running, "partition 1 running")
    f.gate.finish(1, 0)
    await f.gate.until(lambda: f.window_of(TP2).in_flight == 0, "partition 1 done")
    await f.consumer.commit()
    assert f.kafka.commits() == [{TP2: 1}], "only the partition that finished is committed"
    assert f.kafka.flow(TP) == ["pause"]


async def test_kafka_or_redis_down_retries_the_record_in_place_and_holds_the_commit(
        flow: Callable[..., Flow]) -> None:
    f = flow(4)
    f.fetched(TP, [b"a", b"b"])
    await f.gate.until(lambda: f.gate.running == {(0, 0), (0, 1)}, "both running")
    f.gate.finish(0, 1)
    f.gate.fail(0, 0, UnavailableError("cannot reach Redis"))
    loop = asyncio.get_running_loop()
    failed_at = loop.time()
    await f.gate.until(lambda: f.gate.attempts.get((0, 0)) == 2, "offset 0 tried again")
    assert loop.time() - failed_at >= RETRY_BACKOFF_S[0] * 0.9, "retried without a backoff"
    assert f.window_of(TP).in_flight == 1, "the record left the window while retrying"

    await f.consumer.commit()
    assert f.kafka.commits() == [], "a commit passed the record being retried"

    f.gate.finish(0, 0)
    await f.gate.until(lambda: f.window_of(TP).in_flight == 0, "offset 0 done")
    await f.consumer.commit()
    assert f.kafka.commits() == [{TP: 2}]
    assert f.consumer.processed == 2


async def test_stop_during_a_retry_abandons_the_record(flow: Callable[..., Flow]) -> None:
    f = flow(4)
    f.fetched(TP, [b"a"])
    await f.gate.until(lambda: f.gate.running == {(0, 0)}, "running")
    f.consumer._stop.set()  # what run(stop) does on SIGTERM
    f.gate.fail(0, 0, UnavailableError("the broker did not acknowledge a message"))
    await f.gate.until(lambda: f.window_of(TP).in_flight == 0, "offset 0 given up")
    assert f.gate.attempts[(0, 0)] == 1
    assert f.window_of(TP).offsets.to_commit() is None
    assert f.consumer.processed == 0


async def test_release_abandons_what_outlives_the_bound_and_commits_the_rest(
        flow: Callable[..., Flow]) -> None:
    f = flow(4, revoke_timeout_s=0.3)
    f.fetched(TP, [b"a", b"b", b"c", b"d"])
    await f.gate.until(lambda: len(f.gate.running) == 4, "four running")
    f.gate.finish(0, 0)
    f.gate.finish(0, 2)
    await f.gate.until(lambda: f.window_of(TP).in_flight == 2, "two finished")

    releasing = asyncio.create_task(f.consumer.release([TP]))
    f.gate.finish(0, 3)  # ends within the bound; offset 1 does not
    await asyncio.wait_for(releasing, WAIT_S)

    assert f.kafka.commits() == [{TP: 1}], "the commit must stop before the abandoned record"
    assert TP not in f.consumer.windows
    assert f.consumer.processed == 3
    assert f.gate.running == set(), "the abandoned record is still running"

    f.fetched(TP, [b"b", b"d"], first=1)  # reassigned later: the next owner's fresh window
    await f.gate.until(lambda: {(0, 1), (0, 2)} <= f.gate.running, "redelivered records run")
