"""The runtime's stages (acknowledge, decode, dedupe, execute, route) with a fake executor, a
fake producer and the in-memory emission store: timeouts, retries, dead letters, emit-once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import pytest
from aiokafka.structs import ConsumerRecord

from agentfabric.errors import (
    DecodeError,
    PermanentError,
    ToolError,
    TransientError,
    UnavailableError,
)
from schemas.models import DeadLetter, StepMessage
from schemas.serde import decode, encode
from streams.executor import Emit, Job
from streams.idempotency import MemoryEmissionStore
from streams.kafka import Outgoing
from streams.stages import Pass, Pipeline, default_stages

pytestmark = pytest.mark.timeout(20)

TOPIC = "af.wf.work"
NEXT = "af.wf.after"
DLQ = "af.dlq"
TOO_LARGE = PermanentError("the broker refused a message (MessageSizeTooLargeError: [Error 10] "
                           "MessageSizeTooLargeError); it cannot be sent as it is")


def record(value: bytes = b"payload", offset: int = 7,
           key: bytes = b"run-1") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=TOPIC, partition=2, offset=offset, timestamp=0,
                          timestamp_type=0, key=key, value=value, checksum=None,
                          serialized_key_size=len(key), serialized_value_size=len(value),
                          headers=(("traceparent", b"00-x"), ("api-key", b"s3cret")))


def message(attempt: int = 1, **input_: object) -> StepMessage:
    return StepMessage(run_id="run-1", workflow="wf", workflow_version=1, step="work",
                       attempt=attempt, idempotency_key="run-1:work:0", input=dict(input_),
                       event_id="e-1", source="crm", event_type="lead.created",
                       started_at=datetime(2026, 1, 1, tzinfo=UTC))


Run = Callable[[Job], Awaitable[Sequence[Emit]]]


async def forward(job: Job) -> Sequence[Emit]:
    assert isinstance(job.message, StepMessage)
    after = job.message.model_copy(update={"step": "after"})
    return [Emit(NEXT, after.run_id, after)]


class FakeExecutor:
    """One workflow step as the runtime sees it; ``run`` is what executing does."""

    name = "wf.work"
    group = "af.wf.work"
    topics = (TOPIC,)
    max_in_flight = 4
    dlq_topic = DLQ

    def __init__(self, run: Run = forward, *, timeout_s: float = 5.0, attempt: int = 1,
                 max_attempts: int = 3, decode_error: Exception | None = None,
                 pure: bool = False, done_key: str | None = None, **input_: object) -> None:
        self.run = run
        self.pure = pure
        self.done_key = done_key
        self.timeout_s = timeout_s
        self.message = message(attempt, **input_)
        self.max_attempts = max_attempts
        self.decode_error = decode_error
        self.executed: list[Job] = []
        self.retries: list[TransientError] = []

    @property
    def dedupe_key(self) -> str:
        return f"step:{self.message.idempotency_key}:{self.message.attempt}"

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> Job:
        if self.decode_error is not None:
            raise self.decode_error
        return Job(message=self.message, dedupe_key=self.dedupe_key, timeout_s=self.timeout_s,
                   subject=self.message, pure=self.pure, done_key=self.done_key)

    async def execute(self, job: Job) -> Sequence[Emit]:
        self.executed.append(job)
        return await self.run(job)

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        self.retries.append(error)
        assert isinstance(job.message, StepMessage)
        if job.message.attempt >= self.max_attempts:
            return None
        again = job.message.model_copy(update={"attempt": job.message.attempt + 1})
        return Emit(TOPIC, again.run_id, again)


class FakeProducer:
    """Records every ``send_all``; ``refuse`` says which messages the broker refuses."""

    def __init__(self, refuse: Callable[[Outgoing], Exception | None] = lambda m: None) -> None:
        self.refuse = refuse
        self.calls: list[list[Outgoing]] = []
        self.sent: list[Outgoing] = []

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        self.calls.append(list(messages))
        for m in messages:
            error = self.refuse(m)
            if error is not None:
                raise error
        self.sent.extend(messages)


async def run_through(executor: FakeExecutor, producer: FakeProducer,
                      store: MemoryEmissionStore, rec: ConsumerRecord[bytes, bytes] | None = None,
                      ) -> Pass:
    pipeline = Pipeline(executor, default_stages(producer, store))  # type: ignore[arg-type]
    return await pipeline.run(rec or record())


def letter_of(out: Outgoing) -> DeadLetter:
    assert out.topic == DLQ
    return decode(out.value, out.headers, DeadLetter)


def step_of(out: Outgoing) -> StepMessage:
    return decode(out.value, out.headers, StepMessage)


@pytest.fixture
def store() -> MemoryEmissionStore:
    return MemoryEmissionStore()


async def test_a_step_emits_and_its_output_is_acknowledged(store: MemoryEmissionStore) -> None:
    executor, producer = FakeExecutor(), FakeProducer()
    work = await run_through(executor, producer, store)
    [out] = producer.sent
    assert out.topic == NEXT
    assert out.key == b"run-1"
    assert step_of(out).step == "after"
    assert len(producer.calls) == 1, "one record's outputs go in one send"
    assert work.ack_key == executor.dedupe_key
    assert store.entries[executor.dedupe_key][1] is True


class Hang:
    """A step that never ends by itself; remembers whether the timeout cancelled it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def __call__(self, job: Job) -> Sequence[Emit]:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


async def test_a_step_past_its_timeout_is_retried_as_transient(
        store: MemoryEmissionStore) -> None:
    hang = Hang()
    executor, producer = FakeExecutor(hang, timeout_s=0.05, attempt=1), FakeProducer()
    work = await asyncio.wait_for(run_through(executor, producer, store), 5)

    assert hang.cancelled, "the timed-out step was left running"
    [error] = executor.retries
    assert isinstance(error, TransientError)
    assert "wf.work took longer than its timeout of 0.05s" in error.reason
    assert "raise the step's timeout_s" in error.reason
    [out] = producer.sent
    assert out.topic == TOPIC, "the retry goes back to the step's topic"
    retried = step_of(out)
    assert retried.attempt == 2
    assert retried.run_id == "run-1"
    assert work.ack_key == executor.dedupe_key, "a retry is emitted once, like any output"
    assert store.entries[executor.dedupe_key][1] is True


async def test_a_step_past_its_timeout_on_its_last_attempt_is_dead_lettered(
        store: MemoryEmissionStore) -> None:
    hang = Hang()
    executor = FakeExecutor(hang, timeout_s=0.05, attempt=3, max_attempts=3)
    producer = FakeProducer()
    work = await asyncio.wait_for(run_through(executor, producer, store), 5)

    assert hang.cancelled
    assert len(executor.retries) == 1
    [out] = producer.sent
    letter = letter_of(out)
    assert letter.error_type == "TransientError"
    assert "took longer than its timeout of 0.05s" in letter.reason
    assert "gave up after 3 attempts" in letter.reason
    assert "replay the dead letter" in letter.reason
    assert letter.attempts == 3
    assert (letter.topic, letter.partition, letter.offset) == (TOPIC, 2, 7)
    assert letter.consumer_group == "af.wf.work"
    assert (letter.run_id, letter.workflow, letter.step) == ("run-1", "wf", "work")
    assert letter.value == b"payload"
    assert letter.key == b"run-1"
    assert {h.key: h.value for h in letter.headers}["api-key"] == b"[redacted]"
    assert work.ack_key == executor.dedupe_key, "a dead-lettered outcome is remembered"
    assert store.entries[executor.dedupe_key][1] is True, "so a redelivery runs nothing"


async def test_a_transient_error_from_the_step_is_retried(store: MemoryEmissionStore) -> None:
    async def flaky(job: Job) -> Sequence[Emit]:
        raise TransientError("the CRM answered 503; it will be tried again")

    executor, producer = FakeExecutor(flaky, attempt=2), FakeProducer()
    await run_through(executor, producer, store)
    [error] = executor.retries
    assert "503" in error.reason
    assert step_of(producer.sent[0]).attempt == 3


async def test_an_unexpected_exception_is_an_internal_error_dead_letter(
        store: MemoryEmissionStore, caplog: pytest.LogCaptureFixture) -> None:
    async def buggy(job: Job) -> Sequence[Emit]:
        raise KeyError("missing")

    executor, producer = FakeExecutor(buggy), FakeProducer()
    with caplog.at_level(logging.ERROR, logger="streams.stages"):
        work = await run_through(executor, producer, store)
    [out] = producer.sent
    letter = letter_of(out)
    assert letter.error_type == "InternalError"
    assert letter.reason.startswith("internal error KeyError: 'missing'")
    assert "report it and replay the dead letter" in letter.reason
    assert executor.retries == [], "a bug is not retried"
    assert work.ack_key == executor.dedupe_key, "a dead-lettered outcome is remembered"
    assert store.entries[executor.dedupe_key][1] is True, "so a redelivery runs nothing"
    assert "KeyError" in caplog.text, "an unexpected failure is logged with its traceback"


async def test_a_permanent_error_from_the_step_is_dead_lettered_at_once(
        store: MemoryEmissionStore) -> None:
    async def rejects(job: Job) -> Sequence[Emit]:
        raise ToolError("tool 'crm.update' rejected its arguments: amount: not a number")

    executor, producer = FakeExecutor(rejects), FakeProducer()
    await run_through(executor, producer, store)
    letter = letter_of(producer.sent[0])
    assert letter.error_type == "ToolError"
    assert "rejected its arguments" in letter.reason
    assert executor.retries == []


async def test_an_output_the_broker_refuses_is_dead_lettered_and_forgotten(
        store: MemoryEmissionStore) -> None:
    executor = FakeExecutor()
    stored_when_sent: list[bool] = []

    def refuse(m: Outgoing) -> Exception | None:
        if m.topic == NEXT:
            stored_when_sent.append(executor.dedupe_key in store.entries)
            return TOO_LARGE
        return None

    producer = FakeProducer(refuse)
    work = await run_through(executor, producer, store)

    assert stored_when_sent == [True], "the output is stored before it is sent"
    assert [[m.topic for m in call] for call in producer.calls] == [[NEXT], [DLQ]]
    [out] = producer.sent
    letter = letter_of(out)
    assert letter.error_type == "PermanentError"
    assert "MessageSizeTooLargeError" in letter.reason
    assert letter.value == b"payload", "the original record is kept for replay"
    assert letter.run_id == "run-1"
    assert executor.dedupe_key not in store.entries, "the refused output is still stored"
    assert work.ack_key is None


async def test_a_refused_dead_letter_is_sent_again_with_the_value_cut_short(
        store: MemoryEmissionStore) -> None:
    limit = 80_000
    original = bytes(range(256)) * 400  # 102,400 bytes: the dead letter wrapping it is too big

    def refuse(m: Outgoing) -> Exception | None:
        return TOO_LARGE if len(m.value) > limit else None

    executor = FakeExecutor(blob="x" * 100_000)  # its output is too large as well
    producer = FakeProducer(refuse)
    work = await run_through(executor, producer, store, record(original))

    assert [[m.topic for m in call] for call in producer.calls] == [[NEXT], [DLQ], [DLQ]]
    assert len(producer.calls[1][0].value) > limit
    [out] = producer.sent
    letter = letter_of(out)
    assert letter.value == original[:64 * 1024]
    assert "MessageSizeTooLargeError" in letter.reason
    assert (f"the original value of {len(original)} bytes was too large for the dead-letter "
            f"topic; only its first {64 * 1024} bytes are kept") in letter.reason
    assert letter.error_type == "PermanentError"
    assert (letter.topic, letter.offset, letter.run_id) == (TOPIC, 7, "run-1")
    assert work.ack_key is None
    assert store.entries == {}


async def test_a_refused_dead_letter_keeps_the_reason_the_record_failed(
        store: MemoryEmissionStore) -> None:
    original = b"\x00" * 100_000
    producer = FakeProducer(lambda m: TOO_LARGE if len(m.value) > 80_000 else None)
    executor = FakeExecutor(decode_error=DecodeError("the value is neither an agentfabric "
                                                     "message nor JSON"))
    await run_through(executor, producer, store, record(original))
    [out] = producer.sent
    letter = letter_of(out)
    assert letter.value == original[:64 * 1024]
    assert "neither an agentfabric message nor JSON" in letter.reason, letter.reason
    assert letter.error_type == "DecodeError"


async def test_an_acknowledged_output_is_not_sent_again(store: MemoryEmissionStore) -> None:
    executor, producer = FakeExecutor(), FakeProducer()
    first = await run_through(executor, producer, store)
    assert first.ack_key is not None
    assert len(producer.sent) == 1

    again = await run_through(executor, producer, store, record(offset=8))  # a redelivery
    assert executor.executed[1:] == [], "an acknowledged record ran again"
    assert len(producer.calls) == 1, "something was sent for an acknowledged key"
    assert again.outputs == []
    assert again.ack_key is None


async def test_a_stored_unacknowledged_output_is_resent_as_it_was(
        store: MemoryEmissionStore) -> None:
    """Kafka was down after the output was stored: the record is tried again, and the
    second time the stored bytes are sent without running the step again."""
    down = [True]

    def refuse(m: Outgoing) -> Exception | None:
        return UnavailableError("the broker did not acknowledge a message") if down[0] else None

    executor, producer = FakeExecutor(), FakeProducer(refuse)
    with pytest.raises(UnavailableError):
        await run_through(executor, producer, store)
    stored, acked = await store.recall(executor.dedupe_key)
    assert stored is not None
    assert not acked

    down[0] = False
    work = await run_through(executor, producer, store)
    assert len(executor.executed) == 1, "the step ran again instead of re-sending its output"
    assert producer.sent == stored
    assert work.ack_key == executor.dedupe_key
    assert store.entries[executor.dedupe_key][1] is True


async def test_kafka_or_redis_down_in_the_step_is_raised_not_routed(
        store: MemoryEmissionStore) -> None:
    async def down(job: Job) -> Sequence[Emit]:
        raise UnavailableError("cannot reach Redis")

    executor, producer = FakeExecutor(down), FakeProducer()
    with pytest.raises(UnavailableError, match="cannot reach Redis"):
        await run_through(executor, producer, store)
    assert producer.calls == []
    assert executor.retries == []
    assert store.entries == {}, "no attempt is spent and nothing is stored"


async def test_a_record_that_cannot_be_decoded_is_dead_lettered_without_running(
        store: MemoryEmissionStore) -> None:
    executor = FakeExecutor(decode_error=DecodeError("the message has no 'schema' header"))
    producer = FakeProducer()
    work = await run_through(executor, producer, store)
    assert executor.executed == []
    letter = letter_of(producer.sent[0])
    assert letter.error_type == "DecodeError"
    assert "no 'schema' header" in letter.reason
    assert letter.value == b"payload"
    assert letter.run_id is None
    assert letter.attempts == 1
    assert work.job is None
    assert work.ack_key is None
    assert store.entries == {}


async def test_a_decoder_bug_is_an_internal_error_dead_letter(
        store: MemoryEmissionStore) -> None:
    executor = FakeExecutor(decode_error=IndexError("list index out of range"))
    producer = FakeProducer()
    await run_through(executor, producer, store)
    assert executor.executed == []
    letter = letter_of(producer.sent[0])
    assert letter.error_type == "InternalError"
    assert "IndexError: list index out of range" in letter.reason


async def test_a_pure_job_runs_without_a_lease_and_settles_its_output(
        store: MemoryEmissionStore) -> None:
    executor, producer = FakeExecutor(pure=True, done_key="step:run-1:work:0"), FakeProducer()
    # a lease another worker holds does not stop a pure job (running it twice is harmless)
    assert (await store.claim(executor.dedupe_key, None, "other", 60_000)).state == "leased"
    async with asyncio.timeout(2):  # a claim would wait out the other worker's lease
        work = await run_through(executor, producer, store)
    assert store.leases[executor.dedupe_key][0] == "other", "the pure job took a lease"
    assert len(executor.executed) == 1
    assert [step_of(m).step for m in producer.sent] == ["after"]
    assert work.ack_key == executor.dedupe_key
    assert store.entries[executor.dedupe_key][1] is True, "not acknowledged"
    assert "step:run-1:work:0" in store.done


async def test_a_pure_job_sends_the_output_stored_first_not_its_own(
        store: MemoryEmissionStore) -> None:
    """Another run of the key stored its output and died before sending it: the pure job
    runs, but sends those stored bytes, so the output on the broker is the first one."""
    earlier = message().model_copy(update={"step": "stored-first"})
    value, headers = encode(earlier)
    stored = [Outgoing(NEXT, b"run-1", value, tuple(headers))]
    executor, producer = FakeExecutor(pure=True), FakeProducer()
    await store.remember(executor.dedupe_key, stored)
    work = await run_through(executor, producer, store)
    assert len(executor.executed) == 1
    assert [step_of(m).step for m in producer.sent] == ["stored-first"]
    assert work.ack_key == executor.dedupe_key


@pytest.mark.parametrize("left", ["acked", "done"])
async def test_a_pure_job_sends_nothing_when_its_work_was_done(
        store: MemoryEmissionStore, left: str) -> None:
    executor, producer = FakeExecutor(pure=True, done_key="visit"), FakeProducer()
    if left == "acked":
        await store.acknowledge(executor.dedupe_key)
    else:
        store.done.add("visit")  # e.g. a replayed dead letter of a visit that completed
    work = await run_through(executor, producer, store)
    assert len(executor.executed) == 1, "a pure job runs first and settles after"
    assert producer.calls == []
    assert work.outputs == []
    assert work.ack_key is None
    assert executor.dedupe_key not in store.entries or left == "acked"


async def test_a_failed_pure_job_does_not_mark_its_work_done(store: MemoryEmissionStore) -> None:
    async def flaky(job: Job) -> Sequence[Emit]:
        raise TransientError("not yet")

    executor, producer = FakeExecutor(flaky, pure=True, done_key="visit"), FakeProducer()
    await run_through(executor, producer, store)
    assert [m.topic for m in producer.sent] == [TOPIC], "the retry was not sent"
    assert "visit" not in store.done


async def test_a_failed_rerun_of_a_pure_job_sends_the_stored_output_as_a_success(
        store: MemoryEmissionStore) -> None:
    """The first run stored its output and died before sending it; the rerun fails (e.g.
    past the run's deadline). The stored output is sent, and this run's failure is not
    reported with it."""
    async def late(job: Job) -> Sequence[Emit]:
        raise PermanentError("run run-1 passed its deadline")

    earlier = message().model_copy(update={"step": "stored-first"})
    value, headers = encode(earlier)
    executor, producer = FakeExecutor(late, pure=True), FakeProducer()
    await store.remember(executor.dedupe_key, [Outgoing(NEXT, b"run-1", value, tuple(headers))])
    work = await run_through(executor, producer, store)
    assert [step_of(m).step for m in producer.sent] == ["stored-first"]
    assert work.error is None
    assert work.notes == []


@pytest.mark.parametrize("pure", [False, True])
async def test_a_refused_output_leaves_its_work_undone_so_a_replay_runs(
        store: MemoryEmissionStore, pure: bool) -> None:
    executor = FakeExecutor(pure=pure, done_key="visit")
    refused = FakeProducer(lambda m: TOO_LARGE if m.topic == NEXT else None)
    await run_through(executor, refused, store)
    assert [m.topic for m in refused.sent] == [DLQ]
    assert "visit" not in store.done, "the unit of work is marked done though nothing was sent"

    # the dead letter replayed (its own dedupe key, the same unit of work) once the limit is
    # raised: the step runs and its output is sent
    replay = FakeExecutor(pure=pure, done_key="visit")
    replay.message = replay.message.model_copy(update={"idempotency_key": "run-1:work:0:r"})
    producer = FakeProducer()
    await run_through(replay, producer, store)
    assert len(replay.executed) == 1
    assert [m.topic for m in producer.sent] == [NEXT]


async def test_a_failed_run_that_lost_its_lease_sends_the_winners_output_as_a_success(
        store: MemoryEmissionStore) -> None:
    """A step's lease lapsed while it ran, another worker ran the key and stored its output
    first, then this run failed: the winner's output is sent, and this run's failure
    (dead letter, ledger note) is not reported with it."""
    earlier = message().model_copy(update={"step": "stored-first"})
    value, headers = encode(earlier)
    winner = [Outgoing(NEXT, b"run-1", value, tuple(headers))]
    executor = FakeExecutor(done_key="visit")

    async def lost(job: Job) -> Sequence[Emit]:
        await store.remember(executor.dedupe_key, winner)  # the other worker, meanwhile
        raise PermanentError("the CRM refused the lead")

    def attempt_failed(job: Job, outcome: str, error: BaseException, started_s: float,
                       seconds: float) -> list[Emit]:  # the ledger's note of a failed attempt
        assert isinstance(job.message, StepMessage)
        return [Emit("af.run-events", job.message.run_id,
                     job.message.model_copy(update={"step": f"note:{outcome}"}))]

    executor.run = lost
    executor.attempt_failed = attempt_failed  # type: ignore[attr-defined]
    producer = FakeProducer()
    work = await run_through(executor, producer, store)
    assert [step_of(m).step for m in producer.sent] == ["stored-first"], \
        "neither the dead letter nor the note of the failed attempt is sent"
    assert work.error is None
    assert work.failure is None
    assert work.notes == []
    assert work.ack_key == executor.dedupe_key
