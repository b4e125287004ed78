"""One execution per step on a real Redis: the dedupe stage's leases (waited on, lapsing,
renewed) and first-writer-wins publishing, with fake executors and producers.

Each pass runs through its own pipeline (its own lease token, as on two workers) and its own
``RedisEmissionStore`` on the session's Redis. Producers can hold a send until the test lets
it go, so an output is stored but not yet acknowledged when another pass looks at it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import pytest
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from agentfabric.errors import TransientError, UnavailableError
from agentfabric.settings import Settings
from schemas.models import StepMessage
from schemas.serde import decode as decode_value
from streams.embedded import StackInfo
from streams.executor import Emit, Job
from streams.idempotency import Claim, RedisEmissionStore
from streams.kafka import Outgoing
from streams.stages import Acknowledge, Dedupe, Pass, Pipeline, decode, execute, route

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOPIC = "af.wf.work"
NEXT = "af.wf.after"
DLQ = "af.dlq"
DEADLINE_S = 10.0
KEY = "step:run-1:work:0:1"
T = TypeVar("T")


def record() -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=TOPIC, partition=0, offset=7, timestamp=0, timestamp_type=0,
                          key=b"run-1", value=b"payload", checksum=None,
                          serialized_key_size=5, serialized_value_size=7, headers=())


def message() -> StepMessage:
    return StepMessage(run_id="run-1", workflow="wf", workflow_version=1, step="work",
                       idempotency_key="run-1:work:0", input={}, event_id="e-1", source="crm",
                       event_type="lead.created", started_at=datetime(2026, 1, 1, tzinfo=UTC))


class Executor:
    """The step ``work``: emits a message saying who ran it, once ``release`` is set."""

    name = "wf.work"
    group = "af.wf.work"
    topics = (TOPIC,)
    max_in_flight = 4
    dlq_topic = DLQ

    def __init__(self, who: str, ran: list[str], *, blocked: bool = False) -> None:
        self.who = who
        self.ran = ran
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not blocked:
            self.release.set()

    def decode(self, rec: ConsumerRecord[bytes, bytes]) -> Job:
        msg = message()
        return Job(message=msg, dedupe_key=KEY, done_key=f"step:{msg.idempotency_key}",
                   timeout_s=30, subject=msg)

    async def execute(self, job: Job) -> Sequence[Emit]:
        self.ran.append(self.who)
        self.started.set()
        await self.release.wait()
        assert isinstance(job.message, StepMessage)
        after = job.message.model_copy(update={"step": "after", "input": {"by": self.who}})
        return [Emit(NEXT, after.run_id, after)]

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        raise AssertionError(f"nothing here is retried: {error}")


class Producer:
    """Records what it sends; with ``held``, each send waits until ``gate`` is set."""

    def __init__(self, *, held: bool = False) -> None:
        self.sent: list[Outgoing] = []
        self.sending = asyncio.Event()
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        self.sending.set()
        await self.gate.wait()
        self.sent.extend(messages)


class Store(RedisEmissionStore):
    """The real store, noting every claim; ``renewals_fail`` cuts this worker's renewals
    off (Redis unreachable from it), so its leases lapse while its steps run."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        super().__init__(redis, prefix, ttl_s=60)
        self.claims: list[str] = []
        self.busy = asyncio.Event()
        self.renewals_fail = False

    async def claim(self, key: str, done_key: str | None, token: str, lease_ms: int) -> Claim:
        found = await super().claim(key, done_key, token, lease_ms)
        self.claims.append(found.state)
        if found.state == "busy":
            self.busy.set()
        return found

    async def renew(self, leases: dict[str, str], lease_ms: int) -> set[str]:
        if self.renewals_fail:
            raise UnavailableError("Redis is unavailable (from this worker)")
        return await super().renew(leases, lease_ms)


class Worker:
    """One worker's pipeline: acknowledge, decode, dedupe (with its lease keeper), execute,
    route."""

    def __init__(self, redis: Redis, prefix: str, who: str, ran: list[str], *,
                 lease_ttl_s: float, blocked: bool = False, held: bool = False) -> None:
        self.store = Store(redis, prefix)
        self.executor = Executor(who, ran, blocked=blocked)
        self.producer = Producer(held=held)
        self.dedupe = Dedupe(self.store, lease_ttl_s)
        acknowledge = Acknowledge(self.producer, self.store)  # type: ignore[arg-type]
        self.pipeline = Pipeline(self.executor, [acknowledge, decode, self.dedupe, execute,
                                                 route])

    def start(self) -> asyncio.Task[Pass]:
        return asyncio.create_task(self.pipeline.run(record()))


@pytest.fixture
async def redis(stack: StackInfo) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def workers() -> list[Worker]:
    return []


@pytest.fixture(autouse=True)
async def _close_keepers(workers: list[Worker]) -> AsyncIterator[None]:
    yield
    for worker in workers:
        worker.executor.release.set()
        worker.producer.gate.set()
        await worker.dedupe.leases.close()


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, DEADLINE_S)


def by(out: Outgoing) -> str:
    msg = decode_value(out.value, out.headers, StepMessage)
    return str(msg.input["by"])


async def test_two_passes_of_one_key_run_it_once_and_send_the_same_bytes(
        redis: Redis, settings: Settings, workers: list[Worker]) -> None:
    ran: list[str] = []
    one, two = (Worker(redis, settings.topic_prefix, who, ran, lease_ttl_s=5, blocked=True,
                       held=True) for who in ("one", "two"))
    workers += [one, two]
    tasks = [one.start(), two.start()]  # the same record on two workers at once

    # one of them holds the lease and runs; the other finds it busy and waits
    watches = [asyncio.create_task(w.executor.started.wait()) for w in (one, two)]
    try:
        await within(asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED))
    finally:
        for watch in watches:
            watch.cancel()
    running = [w for w in (one, two) if w.executor.started.is_set()]
    assert len(running) == 1, "both workers ran the step at once"
    [runner] = running
    [waiter] = [w for w in (one, two) if w is not runner]
    await within(waiter.store.busy.wait())
    runner.executor.release.set()

    # the runner's output is stored and its send held: the waiter re-sends the stored bytes
    await within(runner.producer.sending.wait())
    await within(waiter.producer.sending.wait())
    runner.producer.gate.set()
    waiter.producer.gate.set()
    passes = [await within(task) for task in tasks]

    assert ran == [runner.executor.who], "the step ran on both workers"
    assert waiter.store.claims[0] == "busy"
    assert waiter.store.claims[-1] == "stored"
    assert one.producer.sent == two.producer.sent
    assert [by(out) for out in one.producer.sent] == [runner.executor.who]
    assert passes[0].outputs == passes[1].outputs
    assert await redis.get(f"{settings.topic_prefix}:emitted:{KEY}") == b"A"
    assert not await redis.exists(f"{settings.topic_prefix}:lease:{KEY}")

    # a third pass (a redelivery) finds the output acknowledged and sends nothing
    three = Worker(redis, settings.topic_prefix, "three", ran, lease_ttl_s=5)
    workers.append(three)
    late = await within(three.start())
    assert three.store.claims == ["acked"]
    assert three.producer.sent == []
    assert ran == [runner.executor.who]
    assert late.outputs == []


@pytest.mark.parametrize("first", ["competitor", "holder"])
async def test_a_lapsed_lease_lets_a_second_pass_run_and_the_first_output_wins(
        redis: Redis, settings: Settings, workers: list[Worker], first: str,
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []
    ttl_s = 0.3
    holder = Worker(redis, settings.topic_prefix, "holder", ran, lease_ttl_s=ttl_s,
                    blocked=True, held=first == "holder")
    competitor = Worker(redis, settings.topic_prefix, "competitor", ran, lease_ttl_s=ttl_s,
                        blocked=first == "holder", held=first == "competitor")
    workers += [holder, competitor]
    holder.store.renewals_fail = True  # the holder's lease will lapse while it runs

    held = holder.start()
    await within(holder.executor.started.wait())
    competing = competitor.start()
    await within(competitor.executor.started.wait())  # the lease lapsed: it runs too
    assert ran == ["holder", "competitor"]
    assert competitor.store.claims[-1] == "leased"

    winner, loser = (competitor, holder) if first == "competitor" else (holder, competitor)
    winner_task, loser_task = (competing, held) if first == "competitor" else (held, competing)
    with caplog.at_level(logging.WARNING, logger="streams.stages"):
        winner.executor.release.set()
        await within(winner.producer.sending.wait())  # published; its send is held
        loser.executor.release.set()
        lost = await within(loser_task)
    winner.producer.gate.set()
    won = await within(winner_task)

    assert f"another worker published the output of {KEY} first" in caplog.text
    assert [by(out) for out in winner.producer.sent] == [first]
    assert loser.producer.sent == winner.producer.sent, "the loser sent its own output"
    assert lost.outputs == won.outputs
    assert await redis.get(f"{settings.topic_prefix}:emitted:{KEY}") == b"A"


async def test_a_renewed_lease_keeps_a_competitor_waiting(
        redis: Redis, settings: Settings, workers: list[Worker]) -> None:
    ran: list[str] = []
    holder = Worker(redis, settings.topic_prefix, "holder", ran, lease_ttl_s=1, blocked=True,
                    held=True)
    competitor = Worker(redis, settings.topic_prefix, "competitor", ran, lease_ttl_s=1)
    workers += [holder, competitor]

    held = holder.start()
    await within(holder.executor.started.wait())
    competing = competitor.start()
    await within(competitor.store.busy.wait())

    # the holder runs 2.5 s, well past its 1 s lease: the keeper renews it meanwhile
    done, _ = await asyncio.wait({competing}, timeout=2.5)
    assert not done, "the competitor stopped waiting while the lease was held"
    assert ran == ["holder"], "the competitor ran the step while the holder held the lease"
    assert set(competitor.store.claims) == {"busy"}
    assert len(competitor.store.claims) >= 3, "the competitor did not keep checking"
    lease = f"{settings.topic_prefix}:lease:{KEY}"
    token = await redis.get(lease)
    assert isinstance(token, bytes)
    assert token.startswith(holder.dedupe.instance.encode()), "someone else holds it"
    assert 0 < await redis.pttl(lease) <= 1000
    assert holder.dedupe.leases.lost == set()

    holder.executor.release.set()
    await within(holder.producer.sending.wait())
    rest = await within(competing)
    holder.producer.gate.set()
    first = await within(held)
    assert ran == ["holder"]
    assert competitor.store.claims[-1] == "stored"
    assert competitor.producer.sent == holder.producer.sent
    assert [by(out) for out in holder.producer.sent] == ["holder"]
    assert rest.outputs == first.outputs
