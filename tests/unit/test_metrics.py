"""The Observe stage and the runtime's metric families, with the fakes of test_stages: each
outcome counts in the right family, usage becomes tokens and cost, labels stay bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from aiokafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from agentfabric.errors import DecodeError, PermanentError, TransientError
from schemas.models import StepMessage, Usage
from schemas.serde import encode
from streams.executor import Emit, Job
from streams.idempotency import MemoryEmissionStore
from streams.kafka import Outgoing
from streams.metrics import Observe, StreamMetrics, spent
from streams.stages import Pass, Pipeline, default_stages

from .test_stages import FakeExecutor, FakeProducer, Run, record, step_of

pytestmark = pytest.mark.timeout(20)


def registry_and_metrics() -> tuple[CollectorRegistry, StreamMetrics]:
    registry = CollectorRegistry()
    return registry, StreamMetrics(registry, "af")


async def observed(executor: FakeExecutor, metrics: StreamMetrics) -> Pass:
    stages = default_stages(FakeProducer(), MemoryEmissionStore(),  # type: ignore[arg-type]
                            observe=Observe(metrics))
    return await Pipeline(executor, stages).run(record())


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def emitting(topic: str, *, used: Usage | None = None) -> Run:
    async def run(job: Job) -> Sequence[Emit]:
        assert isinstance(job.message, StepMessage)
        usage = {"work": job.message.step_usage.get("work", Usage()) + (used or Usage())}
        after = job.message.model_copy(update={"step": "after", "step_usage": usage})
        return [Emit(topic, after.run_id, after)]
    return run


async def test_a_step_that_hands_on_counts_in_out_latency_and_usage() -> None:
    registry, metrics = registry_and_metrics()
    executor = FakeExecutor(emitting("af.wf.after", used=Usage(
        input_tokens=120, output_tokens=30, cost_usd=0.002)))
    executor.message = executor.message.model_copy(update={
        "tenant": "acme", "step_usage": {"work": Usage(input_tokens=5, output_tokens=1)}})
    await observed(executor, metrics)

    assert value(registry, "agentfabric_records_in_total", consumer="wf.work",
                 topic_kind="step") == 1
    assert value(registry, "agentfabric_records_out_total", workflow="wf", step="work",
                 kind="next") == 1
    assert value(registry, "agentfabric_step_seconds_count", workflow="wf", step="work") == 1
    assert value(registry, "agentfabric_tokens_total", workflow="wf", step="work",
                 tenant="acme", direction="in") == 120
    assert value(registry, "agentfabric_tokens_total", workflow="wf", step="work",
                 tenant="acme", direction="out") == 30
    assert value(registry, "agentfabric_cost_usd_total", workflow="wf", step="work",
                 tenant="acme") == pytest.approx(0.002)
    assert value(registry, "agentfabric_in_flight", consumer="wf.work") == 0
    assert value(registry, "agentfabric_step_errors_total", workflow="wf", step="work",
                 error="TransientError") == 0


@pytest.mark.parametrize(("topic", "kind"), [("af.results.wf", "result"),
                                             ("af.approvals", "hand_off"),
                                             ("af.recordings", "recording")])
async def test_outputs_are_counted_by_kind(topic: str, kind: str) -> None:
    registry, metrics = registry_and_metrics()
    await observed(FakeExecutor(emitting(topic)), metrics)
    assert value(registry, "agentfabric_records_out_total", workflow="wf", step="work",
                 kind=kind) == 1


async def test_a_transient_failure_counts_an_error_and_a_retry() -> None:
    async def flaky(job: Job) -> Sequence[Emit]:
        raise TransientError("the CRM answered 503")

    registry, metrics = registry_and_metrics()
    await observed(FakeExecutor(flaky, attempt=1, max_attempts=3), metrics)
    assert value(registry, "agentfabric_step_errors_total", workflow="wf", step="work",
                 error="TransientError") == 1
    assert value(registry, "agentfabric_retries_total", workflow="wf", step="work") == 1
    assert value(registry, "agentfabric_records_out_total", workflow="wf", step="work",
                 kind="retry") == 1
    assert value(registry, "agentfabric_dead_letters_total", workflow="wf", step="work",
                 error="TransientError") == 0
    assert registry.get_sample_value("agentfabric_tokens_total", {
        "workflow": "wf", "step": "work", "tenant": "default", "direction": "in"}) is None


async def test_a_permanent_failure_counts_an_error_and_a_dead_letter() -> None:
    async def broken(job: Job) -> Sequence[Emit]:
        raise PermanentError("the vendor id is not one the ERP knows")

    registry, metrics = registry_and_metrics()
    await observed(FakeExecutor(broken), metrics)
    for name in ("agentfabric_step_errors_total", "agentfabric_dead_letters_total"):
        assert value(registry, name, workflow="wf", step="work", error="PermanentError") == 1
    assert value(registry, "agentfabric_records_out_total", workflow="wf", step="work",
                 kind="dead_letter") == 1
    assert value(registry, "agentfabric_retries_total", workflow="wf", step="work") == 0


async def test_an_unreadable_record_is_counted_as_a_dead_letter_of_its_consumer() -> None:
    registry, metrics = registry_and_metrics()
    await observed(FakeExecutor(decode_error=DecodeError("not Avro, not JSON")), metrics)
    assert value(registry, "agentfabric_dead_letters_total", workflow="wf", step="work",
                 error="DecodeError") == 1
    assert value(registry, "agentfabric_step_errors_total", workflow="wf", step="work",
                 error="DecodeError") == 1


async def test_in_flight_counts_records_being_worked_on() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(job: Job) -> Sequence[Emit]:
        started.set()
        await release.wait()
        return []

    registry, metrics = registry_and_metrics()
    task = asyncio.create_task(observed(FakeExecutor(slow), metrics))
    await started.wait()
    assert value(registry, "agentfabric_in_flight", consumer="wf.work") == 1
    release.set()
    await task
    assert value(registry, "agentfabric_in_flight", consumer="wf.work") == 0


async def test_no_label_is_a_run_id() -> None:
    registry, metrics = registry_and_metrics()
    await observed(FakeExecutor(emitting("af.results.wf", used=Usage(input_tokens=1))),
                   metrics)
    values = {v for family in registry.collect() for s in family.samples
              for v in s.labels.values()}
    assert values
    assert "run-1" not in values
    assert not any(v.startswith(("run-", "step:")) for v in values)


def test_the_cache_hook_counts_hits_and_misses() -> None:
    registry, metrics = registry_and_metrics()
    metrics.cache("wf", "work", True)
    metrics.cache("wf", "work", False)
    metrics.cache("wf", "work", True)
    assert value(registry, "agentfabric_step_cache_total", workflow="wf", step="work",
                 outcome="hit") == 2
    assert value(registry, "agentfabric_step_cache_total", workflow="wf", step="work",
                 outcome="miss") == 1


def test_topic_kinds() -> None:
    _, metrics = registry_and_metrics()
    assert metrics.topic_kind("af.triggers.crm") == "trigger"
    assert metrics.topic_kind("af.retry.wf.work.10s") == "retry"
    assert metrics.topic_kind("af.approvals") == "approvals"
    assert metrics.topic_kind("af.decisions") == "decisions"
    assert metrics.topic_kind("af.wf.work") == "step"


@dataclass
class FakeGroup:
    group: str


@dataclass
class FakeConsumer:
    executor: FakeGroup
    lags: dict[TopicPartition, int] = field(default_factory=dict)

    def lag(self) -> dict[TopicPartition, int]:
        return self.lags


def test_lag_is_set_per_partition_and_dropped_when_given_up() -> None:
    registry, metrics = registry_and_metrics()
    consumer = FakeConsumer(FakeGroup("af.wf.work"), {TopicPartition("af.wf.work", 0): 4,
                                                      TopicPartition("af.wf.work", 1): 0})
    metrics.sample_lag([consumer])  # type: ignore[list-item]
    assert value(registry, "agentfabric_consumer_lag", group="af.wf.work", topic="af.wf.work",
                 partition="0") == 4
    del consumer.lags[TopicPartition("af.wf.work", 0)]
    metrics.sample_lag([consumer])  # type: ignore[list-item]
    assert registry.get_sample_value("agentfabric_consumer_lag", {
        "group": "af.wf.work", "topic": "af.wf.work", "partition": "0"}) is None
    assert value(registry, "agentfabric_consumer_lag", group="af.wf.work", topic="af.wf.work",
                 partition="1") == 0


def test_spent_is_the_step_usage_delta_of_the_same_run() -> None:
    subject = FakeExecutor().message.model_copy(update={
        "step_usage": {"work": Usage(input_tokens=10, cost_usd=0.5)}})
    other = subject.model_copy(update={"run_id": "run-2", "step_usage": {
        "work": Usage(input_tokens=99)}})
    mine = subject.model_copy(update={"step_usage": {
        "work": Usage(input_tokens=15, output_tokens=2, cost_usd=0.75)}})
    used = spent(subject, [Emit("t", "run-2", other), Emit("t", "run-1", mine)])
    assert used is not None
    assert (used.input_tokens, used.output_tokens, used.cost_usd) == (5, 2, 0.25)
    assert spent(subject, [Emit("t", "run-2", other)]) is None


def test_observe_goes_first_in_the_default_stages() -> None:
    _, metrics = registry_and_metrics()
    observe = Observe(metrics)
    stages = default_stages(FakeProducer(), MemoryEmissionStore(),  # type: ignore[arg-type]
                            observe=observe)
    assert stages[0] is observe


async def test_the_ingress_serves_its_own_registry() -> None:
    import httpx

    from agentfabric.ingress.app import create_app
    from agentfabric.settings import Settings

    app = create_app(Settings())  # no lifespan: the route needs no broker
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "process_cpu_seconds_total" in response.text


async def test_a_run_that_lost_its_lease_still_counts_the_tokens_it_spent() -> None:
    """Its lease lapsed while the model answered and another worker stored its output first:
    the winner's output is sent, but this run's model call was made and paid for."""
    registry, metrics = registry_and_metrics()
    store = MemoryEmissionStore()
    spend = emitting("af.wf.after", used=Usage(input_tokens=70, output_tokens=7,
                                                 cost_usd=0.001))
    executor = FakeExecutor()
    winner = executor.message.model_copy(update={"step": "stored-first"})

    async def lost(job: Job) -> Sequence[Emit]:
        value_, headers = encode(winner)
        await store.remember(executor.dedupe_key, [Outgoing("af.wf.after", b"run-1", value_,
                                                            tuple(headers))])
        return await spend(job)

    executor.run = lost
    executor.message = executor.message.model_copy(update={"tenant": "acme"})
    producer = FakeProducer()
    stages = default_stages(producer, store, observe=Observe(metrics))  # type: ignore[arg-type]
    await Pipeline(executor, stages).run(record())

    assert [step_of(m).step for m in producer.sent] == ["stored-first"]
    assert value(registry, "agentfabric_tokens_total", workflow="wf", step="work",
                 tenant="acme", direction="in") == 70
    assert value(registry, "agentfabric_cost_usd_total", workflow="wf", step="work",
                 tenant="acme") == pytest.approx(0.001)


async def test_a_retried_attempt_that_lost_its_lease_counts_no_usage_from_its_retry() -> None:
    """The attempt failed transiently and its lease lapsed meanwhile: the winner's output is
    sent and the retry message is dropped, so nothing is read from that message as usage."""
    registry, metrics = registry_and_metrics()
    store = MemoryEmissionStore()
    executor = FakeExecutor()
    executor.message = executor.message.model_copy(update={"tenant": "acme"})
    winner = executor.message.model_copy(update={"step": "stored-first"})

    async def lost(job: Job) -> Sequence[Emit]:
        value_, headers = encode(winner)
        await store.remember(executor.dedupe_key, [Outgoing("af.wf.after", b"run-1", value_,
                                                            tuple(headers))])
        raise TransientError("model timed out")

    def retry_with_usage(job: Job, error: TransientError) -> Emit:
        assert isinstance(job.message, StepMessage)
        again = job.message.model_copy(update={"attempt": 2, "step_usage": {
            "work": Usage(input_tokens=500, output_tokens=50, cost_usd=0.5)}})
        return Emit("af.wf.work", again.run_id, again)

    executor.run = lost
    executor.retry = retry_with_usage  # type: ignore[method-assign]
    producer = FakeProducer()
    stages = default_stages(producer, store, observe=Observe(metrics))  # type: ignore[arg-type]
    await Pipeline(executor, stages).run(record())

    assert [step_of(m).step for m in producer.sent] == ["stored-first"]
    assert value(registry, "agentfabric_tokens_total", workflow="wf", step="work",
                 tenant="acme", direction="in") == 0
    assert value(registry, "agentfabric_cost_usd_total", workflow="wf", step="work",
                 tenant="acme") == 0
    assert value(registry, "agentfabric_retries_total", workflow="wf", step="work") == 0
