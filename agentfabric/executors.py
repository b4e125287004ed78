"""The workflow engine wired into the runtime's executor protocol (``streams.executor``):
the router (trigger -> first step of each workflow it starts), one executor per step, and
the approvals: one registers every hand-off in Redis (for listing and expiry), one resumes
or ends runs with the decisions people (or the expiry sweeper) made.

The engine takes and returns models; these executors say which topic each model goes to,
how a record is deduped, how long a step may run and how a transient failure is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka import ConsumerRecord

from agents.engine import Decision, Emitted, Engine, root_run_id
from schemas.models import (
    ApprovalDecision,
    HandOff,
    RunResult,
    StepMessage,
    TriggerEvent,
    utc_now,
)
from schemas.serde import decode, unseal
from streams.codec import (
    FIRST_FAILURE_HEADER,
    REPLAY_HEADER,
    RETRY_DUE_HEADER,
    decode_trigger,
    header_ms,
    header_text,
    trace_header,
    trace_of,
)
from streams.executor import Emit, Job
from streams.topics import TopicNames

from . import tracing
from .approvals import APPROVAL_HEADER, ApprovalStore
from .consumers import SideConsumer
from .errors import TransientError
from .ledger import failed_event, step_event
from .settings import Settings
from .tenancy import TenantVerifier

__all__ = ["ApprovalRegistrar", "DecisionExecutor", "RetryExecutor", "RouterExecutor",
           "StepExecutor", "approval_executors", "executors_for"]


class RouterExecutor:
    """Reads every trigger topic; starts the runs of each workflow an event triggers."""

    def __init__(self, engine: Engine, names: TopicNames, settings: Settings,
                 tenancy: TenantVerifier | None = None) -> None:
        self.engine = engine
        self.names = names
        self.name = "router"
        # without the signing secret no signature verifies: every event gets its source's
        # policy (the worker loads the secret from Redis and passes a verifier)
        self.tenancy = tenancy or TenantVerifier(None, settings.trigger_tenants)
        self.group = names.router_group
        self.sources = {names.trigger(s): s for s in engine.workflows.sources()}
        self.topics = list(self.sources)
        self.max_in_flight = settings.max_in_flight
        self.dlq_topic = names.dlq
        self.timeout_s = settings.step_timeout_s

    def decode(self, record: ConsumerRecord) -> Job:
        source = self.sources.get(record.topic, "")
        event = decode_trigger(record, source, self.tenancy.tenant_of)
        done = f"trigger:{event.tenant}:{event.source}:{event.event_id}"
        replay_of = header_text(record, REPLAY_HEADER)
        return Job(message=event, dedupe_key=f"{done}:replay:{replay_of}" if replay_of else done,
                   done_key=done, timeout_s=self.timeout_s, trace_parent=trace_of(record),
                   replay_of=replay_of, pure=True)

    async def execute(self, job: Job) -> Sequence[Emit]:
        event = job.message
        assert isinstance(event, TriggerEvent)
        # an event sent with a trace gets a span here (its id derived from the event, so a
        # redelivery emits the same bytes): the parent of its runs' first steps
        incoming = tracing.parse_traceparent(job.trace_parent)
        if incoming is None:
            return [Emit(self.names.step(m.workflow, m.step), m.run_id, m, trace_header(m))
                    for m in self.engine.start(event, None)]
        routed = incoming._replace(span_id=tracing.span_id_for(f"route:{job.done_key}"))
        with tracing.linked_span(f"route {event.source}", incoming, span_id=routed.span_id,
                                 source=event.source, tenant=event.tenant,
                                 event_type=event.event_type) as span:
            started = self.engine.start(event, routed.header)
            span.outcome("started" if started else "none")
            span.set(runs=len(started))
        return [Emit(self.names.step(m.workflow, m.step), m.run_id, m, trace_header(m))
                for m in started]

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        return None  # starting runs is a pure function of the event: nothing to wait out


class StepExecutor:
    """Runs one step of one workflow; a transient failure retries, then dead-letters."""

    def __init__(self, engine: Engine, names: TopicNames, settings: Settings, workflow: str,
                 step: str) -> None:
        self.engine = engine
        self.names = names
        self.name = f"{workflow}.{step}"
        self.group = names.step_group(workflow, step)
        self.topics = [names.step(workflow, step)]
        self.dlq_topic = names.dlq
        self.max_attempts = settings.max_attempts
        self.tiers = settings.retry_tiers_s
        self.default_timeout_s = settings.step_timeout_s
        # looked up once, not per record: (workflow, version, step) -> the step's timeout_s
        self.timeouts = {(wf.name, wf.version, s.id): s.timeout_s for wf in engine.workflows
                         for s in wf.steps if s.timeout_s}
        spec = engine.workflows.step_spec(workflow, step)
        declared = spec.max_in_flight if spec is not None else None
        self.max_in_flight = declared or settings.max_in_flight

    def _timeout(self, message: StepMessage) -> float:
        return self.timeouts.get((message.workflow, message.workflow_version, message.step),
                                 self.default_timeout_s)

    def decode(self, record: ConsumerRecord) -> Job:
        message = decode(record.value, record.headers, StepMessage)
        # a step run again on an approval is a unit of work of its own (the first run
        # parked the run, which completed that one)
        approval_of = header_text(record, APPROVAL_HEADER)
        done = f"step:{message.idempotency_key}" + (f":approved:{approval_of}" if approval_of
                                                    else "")
        replay_of = header_text(record, REPLAY_HEADER)
        lineage = f":replay:{replay_of}" if replay_of else ""
        return Job(message=message, dedupe_key=f"{done}{lineage}:{message.attempt}",
                   done_key=done, timeout_s=self._timeout(message), subject=message,
                   trace_parent=message.trace_parent,
                   first_failure_ms=header_ms(record, FIRST_FAILURE_HEADER),
                   replay_of=replay_of, approval_of=approval_of,
                   pure=self.engine.is_pure(message))

    async def execute(self, job: Job) -> Sequence[Emit]:
        message = job.message
        assert isinstance(message, StepMessage)
        # a replay of a dead letter starts a fresh journal: the journaled failure is what
        # the replay is meant to get past
        journal = message.idempotency_key + (f":replay:{job.replay_of}" if job.replay_of
                                             else "")
        started, clock = utc_now(), time.perf_counter()
        lineage = ":".join(f"{k}:{v}" for k, v in (("replay", job.replay_of),
                                                    ("approved", job.approval_of)) if v)
        with tracing.step_span(self.name, message, lineage) as span:
            run = await self.engine.run_step(message, journal_key=journal,
                                             approval_of=job.approval_of)
            out = [self._route(emitted) for emitted in run.emitted]
            if run.recording is not None:
                out.append(Emit(self.names.recordings, root_run_id(message), run.recording))
            # the run ledger's event: one small record, acknowledged with the outputs
            event = step_event(message, run.emitted, started,
                               (time.perf_counter() - clock) * 1000)
            out.append(Emit(self.names.run_events, message.run_id, event))
            span.outcome(event.outcome)
            span.set(status=event.status, emitted=len(run.emitted))
        return out

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        """The next attempt, on the retry topic of the tier this attempt number reaches:
        the step's own topic never waits for it."""
        message = job.message
        assert isinstance(message, StepMessage)
        if message.attempt >= self.max_attempts:
            return None
        delay = self.tiers[min(message.attempt, len(self.tiers)) - 1]
        now_ms = int(time.time() * 1000)
        first = job.first_failure_ms or now_ms
        again = message.model_copy(update={"attempt": message.attempt + 1})
        return Emit(self.names.retry(again.workflow, again.step, delay), again.run_id, again,
                    (*trace_header(again), *_lineage(job),
                     (RETRY_DUE_HEADER, str(now_ms + int(delay * 1000)).encode()),
                     (FIRST_FAILURE_HEADER, str(first).encode())))

    def _route(self, after: Emitted) -> Emit:
        return _route(self.names, after)

    def attempt_failed(self, job: Job, outcome: str, error: BaseException, started_s: float,
                       seconds: float) -> Sequence[Emit]:
        """The run ledger's event of a failed attempt, sent with its retry or dead letter."""
        message = job.message
        assert isinstance(message, StepMessage)
        event = failed_event(message, outcome, error, started_s, seconds)
        return [Emit(self.names.run_events, message.run_id, event)]


def _route(names: TopicNames, after: Emitted,
           extra_headers: tuple[tuple[str, bytes], ...] = ()) -> Emit:
    """The topic an emitted model goes to."""
    if isinstance(after, RunResult):
        return Emit(names.results(after.workflow), after.run_id, after)
    if isinstance(after, HandOff):
        return Emit(names.approvals, after.run_id, after)
    return Emit(names.step(after.workflow, after.step), after.run_id, after,
                (*trace_header(after), *extra_headers))


class RetryExecutor:
    """Reads the retry topics of the selected workflows' steps: holds each run until it is
    due, then puts it back on its step's topic. A held run occupies a slot of its
    partition's window (its partition pauses when the window is full), never the step's
    consumer; runs on one tier's partition come due in the order they arrived."""

    def __init__(self, names: TopicNames, settings: Settings,
                 steps: Sequence[tuple[str, str]]) -> None:
        self.names = names
        self.name = "retry"
        self.group = names.retry_group
        self.topics = sorted({names.retry(wf, step, delay) for wf, step in steps
                              for delay in settings.retry_tiers_s})
        self.max_in_flight = settings.max_in_flight
        self.dlq_topic = names.dlq
        self.grace_s = settings.step_timeout_s
        # runs wait here a second or more: polling as often as a step's consumer would only
        # load the broker (the embedded one does not wake a waiting fetch)
        self.fetch_max_wait_ms = max(settings.fetch_max_wait_ms,
                                     min(250, int(min(settings.retry_tiers_s) * 250)))

    def decode(self, record: ConsumerRecord) -> Job:
        message = decode(record.value, record.headers, StepMessage)
        due_ms = header_ms(record, RETRY_DUE_HEADER) or 0
        wait_s = max(0.0, due_ms / 1000 - time.time())
        return Job(message=message, dedupe_key=None, timeout_s=wait_s + self.grace_s,
                   subject=message, trace_parent=message.trace_parent, due_ms=due_ms,
                   first_failure_ms=header_ms(record, FIRST_FAILURE_HEADER),
                   replay_of=header_text(record, REPLAY_HEADER))

    async def execute(self, job: Job) -> Sequence[Emit]:
        message = job.message
        assert isinstance(message, StepMessage)
        wait_s = (job.due_ms or 0) / 1000 - time.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        headers = (*trace_header(message), *_lineage(job))
        if job.first_failure_ms is not None:
            headers = (*headers, (FIRST_FAILURE_HEADER, str(job.first_failure_ms).encode()))
        return [Emit(self.names.step(message.workflow, message.step), message.run_id, message,
                     headers)]

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        return None  # putting a run back on its topic has nothing to wait out


PEOPLE_WAIT_MS = 200  # the approvals and decisions topics carry what people do


def _lineage(job: Job) -> tuple[tuple[str, bytes], ...]:
    """The replay and approval lineage a retried record keeps (its dedupe keys depend on
    it)."""
    return (*(((REPLAY_HEADER, job.replay_of.encode()),) if job.replay_of else ()),
            *(((APPROVAL_HEADER, job.approval_of.encode()),) if job.approval_of else ()))


class ApprovalRegistrar(SideConsumer):
    """Reads the approvals topic: registers every hand-off in Redis (idempotently) so it
    can be listed, found by run id, and expired by the sweeper."""

    def __init__(self, names: TopicNames, settings: Settings, store: ApprovalStore) -> None:
        super().__init__(settings, name="approvals", group=names.approvals_group,
                         topic=names.approvals, wait_ms=PEOPLE_WAIT_MS)
        self.store = store

    def decode(self, record: ConsumerRecord) -> Job:
        hand_off = decode(record.value, record.headers, HandOff)
        return Job(message=hand_off, dedupe_key=None, timeout_s=self.timeout_s)

    async def execute(self, job: Job) -> Sequence[Emit]:
        assert isinstance(job.message, HandOff)
        await self.store.register(job.message)
        return []


class DecisionExecutor(SideConsumer):
    """Reads the decisions topic: resumes each decided run once (approved: on, or its step
    again for a tool call; rejected or expired: on_reject, or the run's result)."""

    def __init__(self, engine: Engine, names: TopicNames, settings: Settings) -> None:
        super().__init__(settings, name="decisions", group=names.decisions_group,
                         topic=names.decisions, wait_ms=PEOPLE_WAIT_MS)
        self.engine = engine
        self.names = names

    def decode(self, record: ConsumerRecord) -> Job:
        decision = decode(record.value, record.headers, ApprovalDecision)
        hand_off = unseal(decision.hand_off, decision.hand_off_schema, HandOff)
        message = unseal(hand_off.envelope, hand_off.envelope_schema, StepMessage)
        done = f"decision:{decision.hand_off_id}"
        replay_of = header_text(record, REPLAY_HEADER)
        return Job(message=decision, dedupe_key=f"{done}:replay:{replay_of}" if replay_of
                   else done, done_key=done, timeout_s=self.timeout_s, subject=message,
                   trace_parent=message.trace_parent, replay_of=replay_of)

    async def execute(self, job: Job) -> Sequence[Emit]:
        decision = job.message
        assert isinstance(decision, ApprovalDecision)
        hand_off = unseal(decision.hand_off, decision.hand_off_schema, HandOff)
        resumed = await self.engine.resume(hand_off, Decision(
            approved=decision.approved, by=decision.by,
            comment=decision.note if decision.approved else decision.reason,
            expired=decision.expired, decided_at=decision.decided_at))
        again: tuple[tuple[str, bytes], ...] = ()
        if decision.approved and hand_off.kind == "tool_approval":
            again = ((APPROVAL_HEADER, decision.hand_off_id.encode()),)
        return [_route(self.names, after, again) for after in resumed]


def approval_executors(engine: Engine, settings: Settings,
                       store: ApprovalStore) -> list[ApprovalRegistrar | DecisionExecutor]:
    """The consumers of the approvals and decisions topics (every worker runs them)."""
    names = TopicNames(settings.topic_prefix)
    return [ApprovalRegistrar(names, settings, store), DecisionExecutor(engine, names,
                                                                        settings)]


def executors_for(engine: Engine, settings: Settings, workflows: Sequence[str], *,
                  router: bool = True, tenancy: TenantVerifier | None = None,
                  ) -> list[RouterExecutor | StepExecutor | RetryExecutor]:
    """The router (if asked, deciding tenants with ``tenancy``), one executor per step of
    ``workflows``, and the retry tiers of those steps."""
    names = TopicNames(settings.topic_prefix)
    found: list[RouterExecutor | StepExecutor | RetryExecutor] = []
    if router:
        found.append(RouterExecutor(engine, names, settings, tenancy))
    steps = [(name, step) for name in workflows for step in engine.workflows.step_ids(name)]
    found.extend(StepExecutor(engine, names, settings, name, step) for name, step in steps)
    if steps:
        found.append(RetryExecutor(names, settings, steps))
    return found
