"""Prometheus metrics of the runtime, on a registry the caller passes (nothing global, nothing
on import). One stage, :class:`Observe`, reads what each record's way through the other stages
left on its :class:`~streams.stages.Pass`; the consumer lag is sampled from the consumers.

    agentfabric_records_in_total{consumer,topic_kind}        records taken (each pass)
    agentfabric_records_out_total{workflow,step,kind}        records produced, by kind
    agentfabric_step_seconds{workflow,step}                  time from taking to acknowledging
    agentfabric_step_errors_total{workflow,step,error}       failures by exception class
    agentfabric_retries_total{workflow,step}                 attempts sent to a retry tier
    agentfabric_dead_letters_total{workflow,step,error}      dead letters by exception class
    agentfabric_tokens_total{workflow,step,tenant,direction} model tokens (direction in/out)
    agentfabric_cost_usd_total{workflow,step,tenant}         model cost in US dollars
    agentfabric_step_cache_total{workflow,step,outcome}      step cache hit/miss (``cache``)
    agentfabric_in_flight{consumer}                          records being worked on now
    agentfabric_consumer_lag{group,topic,partition}          highwater minus the next offset
                                                             not yet finished

``workflow`` and ``step`` name the step that produced (for the router, the retry tiers, the
approvals and decisions consumers: ``workflow`` is the run's workflow if known, else empty,
and ``step`` is the consumer's name). Every label value is bounded by configuration (workflow,
step, tenant and topic names, exception classes): never a run id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.models import StepMessage, Usage

from .executor import Emit
from .stages import Next, Pass
from .topics import TopicNames

if TYPE_CHECKING:
    from .consumer import StepConsumer

__all__ = ["LAG_INTERVAL_S", "MetricsServer", "Observe", "StreamMetrics", "spent"]

LAG_INTERVAL_S = 1.0
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class StreamMetrics:
    """The runtime's metric families on ``registry``; ``prefix`` is the topic prefix (to tell
    a result topic from a step topic)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.registry = registry
        self.names = TopicNames(prefix)
        r = registry
        self.records_in = Counter("agentfabric_records_in", "Records taken by a consumer "
                                  "(a record tried again in place counts again).",
                                  ["consumer", "topic_kind"], registry=r)
        self.records_out = Counter("agentfabric_records_out", "Records produced by a step, by "
                                   "kind: next, result, retry, dead_letter, hand_off, "
                                   "recording, run_event.", ["workflow", "step", "kind"],
                                   registry=r)
        self.step_seconds = Histogram("agentfabric_step_seconds", "Time from taking a record "
                                      "to acknowledging its output.", ["workflow", "step"],
                                      buckets=_BUCKETS, registry=r)
        self.step_errors = Counter("agentfabric_step_errors", "Failed attempts by exception "
                                   "class (retried or dead-lettered).",
                                   ["workflow", "step", "error"], registry=r)
        self.retries = Counter("agentfabric_retries", "Attempts sent to a retry tier.",
                               ["workflow", "step"], registry=r)
        self.dead_letters = Counter("agentfabric_dead_letters", "Dead letters by exception "
                                    "class.", ["workflow", "step", "error"], registry=r)
        self.tokens = Counter("agentfabric_tokens", "Model tokens a step used (direction in: "
                              "prompt, out: completion).",
                              ["workflow", "step", "tenant", "direction"], registry=r)
        self.cost = Counter("agentfabric_cost_usd", "Model cost a step incurred, in US dollars.",
                            ["workflow", "step", "tenant"], registry=r)
        self.step_cache = Counter("agentfabric_step_cache", "Step cache lookups by outcome "
                                  "(hit, miss).", ["workflow", "step", "outcome"], registry=r)
        self.in_flight = Gauge("agentfabric_in_flight", "Records a consumer is working on.",
                               ["consumer"], registry=r)
        self.lag = Gauge("agentfabric_consumer_lag", "Records of a partition not yet finished: "
                         "its highwater minus the next offset to finish.",
                         ["group", "topic", "partition"], registry=r)
        self._lag_labels: set[tuple[str, str, str]] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, family: Counter | Gauge | Histogram, *labels: str) -> Any:
        """``family.labels(*labels)``, looked up once per label set: every record calls this
        a handful of times, and ``labels`` validates and locks each time. (Not for the lag
        gauge, whose label sets are removed.)"""
        key = (id(family), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*labels)
        return found

    def cache(self, workflow: str, step: str, hit: bool) -> None:
        """One step cache lookup (the hook the engine's step cache calls)."""
        self.child(self.step_cache, workflow, step, "hit" if hit else "miss").inc()

    def topic_kind(self, topic: str) -> str:
        """trigger, retry, approvals, decisions or step: what a consumed topic carries."""
        n = self.names
        if topic.startswith(f"{n.prefix}.triggers."):
            return "trigger"
        if topic.startswith(f"{n.prefix}.retry."):
            return "retry"
        if topic in (n.approvals, n.decisions):
            return topic.rsplit(".", 1)[1]
        return "step"

    def output_kind(self, topic: str, retried: bool) -> str:
        n = self.names
        if topic == n.dlq:
            return "dead_letter"
        if topic == n.run_events:  # also the event of a failed attempt, beside its retry
            return "run_event"
        if retried or topic.startswith(f"{n.prefix}.retry."):
            return "retry"
        if topic.startswith(f"{n.prefix}.results."):
            return "result"
        if topic == n.approvals:
            return "hand_off"
        if topic == n.recordings:
            return "recording"
        return "next"

    def sample_lag(self, consumers: Sequence[StepConsumer]) -> None:
        """Set the lag of every partition the consumers hold; drop the ones they gave up."""
        seen: set[tuple[str, str, str]] = set()
        for consumer in consumers:
            for tp, lag in consumer.lag().items():
                labels = (consumer.executor.group, tp.topic, str(tp.partition))
                self.lag.labels(*labels).set(lag)
                seen.add(labels)
        for gone in self._lag_labels - seen:
            with contextlib.suppress(KeyError):
                self.lag.remove(*gone)
        self._lag_labels = seen

    async def sample_lag_every(self, consumers: Sequence[StepConsumer],
                               interval_s: float = LAG_INTERVAL_S) -> None:
        while True:
            self.sample_lag(consumers)
            await asyncio.sleep(interval_s)


def _where(work: Pass) -> tuple[str, str, StepMessage | None]:
    """(workflow, step) labels, and the run envelope if the consumer is that step's own."""
    subject = work.job.subject if work.job is not None else None
    workflow, _, step = work.executor.name.rpartition(".")
    if subject is not None and workflow == subject.workflow and step == subject.step:
        return workflow, step, subject
    return workflow or (subject.workflow if subject is not None else ""), step, None


def spent(subject: StepMessage, emits: Sequence[Emit]) -> Usage | None:
    """What the step of ``subject`` used, from the first emitted model of the same run that
    carries its per-step usage (None if none does, e.g. a hand-off or a sub-workflow's end)."""
    before = subject.step_usage.get(subject.step, Usage())
    for emit in emits:
        model = emit.model
        step_usage = getattr(model, "step_usage", None)
        if getattr(model, "run_id", None) != subject.run_id or not isinstance(step_usage, dict):
            continue
        after = step_usage.get(subject.step)
        if not isinstance(after, Usage):
            continue
        return Usage(input_tokens=max(0, after.input_tokens - before.input_tokens),
                     output_tokens=max(0, after.output_tokens - before.output_tokens),
                     cost_usd=max(0.0, after.cost_usd - before.cost_usd))
    return None


class Observe:
    """The observing stage: counts the record in, times it, and counts what the other stages
    decided (outputs by kind, failures, retries, dead letters, usage). Put it first in the
    stages, so it sees the outputs as acknowledged (a refused output's dead letter
    included) and the time includes the produce acknowledgements."""

    def __init__(self, metrics: StreamMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, work: Pass, after: Next) -> None:
        m, consumer = self.metrics, work.executor.name
        m.child(m.records_in, consumer, m.topic_kind(work.record.topic)).inc()
        in_flight = m.child(m.in_flight, consumer)
        in_flight.inc()
        start = time.perf_counter()
        try:
            await after(work)
        finally:
            in_flight.dec()
        self.observe(work, time.perf_counter() - start)

    def observe(self, work: Pass, seconds: float) -> None:
        m = self.metrics
        workflow, step, own = _where(work)
        m.child(m.step_seconds, workflow, step).observe(seconds)
        failure = work.failure or work.error
        if failure is not None:
            m.child(m.step_errors, workflow, step, type(failure).__name__).inc()
        if work.retried:
            m.child(m.retries, workflow, step).inc()
        if work.error is not None:
            m.child(m.dead_letters, workflow, step, type(work.error).__name__).inc()
        for out in work.outputs:
            m.child(m.records_out, workflow, step, m.output_kind(out.topic, work.retried)).inc()
        if own is not None and work.emits and not work.retried:
            used = spent(own, work.emits)
            if used is not None:
                m.child(m.tokens, workflow, step, own.tenant, "in").inc(used.input_tokens)
                m.child(m.tokens, workflow, step, own.tenant, "out").inc(used.output_tokens)
                m.child(m.cost, workflow, step, own.tenant).inc(used.cost_usd)


class MetricsServer:
    """``GET /metrics`` of ``registry`` on ``host:port``, served from a thread until
    ``stop``."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, host, registry=registry)
        self.port = int(self._server.server_address[1])
        self.url = f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join(timeout=5)
