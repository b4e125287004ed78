"""The workflow engine: functions of a message, holding no run state between calls.

``start`` turns a trigger event into the first step message of each workflow it starts;
``run_step`` runs one step of a run and returns what it emits: the next step's message,
the messages of parallel branches or of a called workflow, the run's result (and the
caller's continuation), or a hand-off to a person. The only shared state is the join
store of parallel fan-outs. Run ids derive from the event, so a redelivered trigger
yields the same runs and idempotency keys, which the step workers use to dedupe.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from agentfabric.errors import (
    ApprovalRequired,
    ConfigError,
    PermanentError,
    UnknownStepError,
    UnknownWorkflowError,
)
from agentfabric.tracing import TraceParent, parse_traceparent, step_span_id
from schemas.models import (
    Frame,
    HandOff,
    ParentCall,
    RunResult,
    StepMessage,
    StepRecording,
    TriggerEvent,
    Usage,
    canonical_json,
    utc_now,
)
from schemas.serde import seal, unseal
from tools.knowledge import KnowledgeBase

from .budgets import BudgetExceeded, Budgets
from .cache import CacheHook, StepCache, run_cached
from .joins import JoinStore, MemoryJoinStore
from .journal import Journal
from .models import ModelClient
from .recording import InteractionLog, Replay, ToolCaller, output_bytes
from .steps import END, StepContext, StepOutcome, StepSpec
from .steps.base import HandOffRequest, SubWorkflowCall, ToolCallLimitExceeded
from .steps.flow import ApprovalStep, ParallelStep
from .workflow import Workflow, WorkflowSet, step_scope

__all__ = [
    "MAX_CALL_DEPTH",
    "RUN_NAMESPACE",
    "Decision",
    "Emitted",
    "Engine",
    "StepRun",
    "first_message",
    "idempotency_key",
    "root_run_id",
    "run_id_for",
    "trace_parent_for",
]

MAX_CALL_DEPTH = 8
Emitted = StepMessage | RunResult | HandOff

RUN_NAMESPACE = uuid.UUID("6f1c2b1e-8f0a-4e57-9a43-0c0f3b8e5d21")


def run_id_for(event: TriggerEvent, workflow: str) -> str:
    """The same event and workflow always give the same run id."""
    basis = "\x1f".join((event.tenant, event.source, event.event_id, workflow))
    return str(uuid.uuid5(RUN_NAMESPACE, basis))


def first_message(wf: Workflow, event: TriggerEvent, now: datetime,
                  trace_parent: str | None = None) -> StepMessage:
    """The message that starts ``wf`` for ``event`` (its run id derives from the event, so
    the same event always starts the same run). The router uses it for trigger events; the
    run API and the client use it to start one workflow directly."""
    run_id = run_id_for(event, wf.name)
    key = idempotency_key(run_id, wf.first_step, 0)
    return StepMessage(
        run_id=run_id, workflow=wf.name, workflow_version=wf.version, step=wf.first_step,
        tenant=event.tenant, trace_parent=_first_trace_parent(run_id, key, trace_parent),
        idempotency_key=key, input=event.payload, context={}, event_id=event.event_id,
        source=event.source, event_type=event.event_type, started_at=now,
        deadline=now + timedelta(seconds=wf.timeout_s) if wf.timeout_s else None)


def idempotency_key(run_id: str, step: str, visit: int, frames: Sequence[Frame] = ()) -> str:
    """Unique per visit of a step in a run (a loop visits a step more than once) and per
    parallel branch it runs in."""
    branches = "".join(f"/{f.branch}" for f in frames)
    return f"{run_id}:{step}{branches}:{visit}"


def trace_parent_for(run_id: str, key: str, incoming: str | None = None,
                     attempt: int = 1) -> str:
    """The W3C traceparent of a message emitted by attempt ``attempt`` of step visit ``key``:
    the incoming trace id (and flags) if any, else one derived from the run; the parent span
    is that attempt's step span (``agentfabric.tracing.step_span_id``), so the next step's
    span is its child."""
    parent = parse_traceparent(incoming)
    trace_id = parent.trace_id if parent is not None else uuid.UUID(run_id).hex
    flags = parent.flags if parent is not None else "01"
    return TraceParent(trace_id, step_span_id(key, attempt), flags).header


def _first_trace_parent(run_id: str, key: str, incoming: str | None) -> str:
    """A run's first message keeps the caller's traceparent (its span is the first step's
    parent); without one, it names the first step's own span: a root (see tracing)."""
    parent = parse_traceparent(incoming)
    return parent.header if parent is not None else trace_parent_for(run_id, key)


def root_run_id(msg: StepMessage) -> str:
    """The run that started it all: a called workflow's run belongs to its caller's."""
    while msg.parent is not None:
        msg = unseal(msg.parent.envelope, msg.parent.envelope_schema, StepMessage)
    return msg.run_id


def _total(step_usage: dict[str, Usage]) -> Usage:
    return sum(step_usage.values(), Usage())


@dataclass
class StepRun:
    """What running one step gave: the messages it emits, its output, its recording."""

    emitted: list[Emitted]
    output: Any
    recording: StepRecording | None = None

    @property
    def next(self) -> Emitted:
        """The one emitted message (for steps that emit exactly one)."""
        [only] = self.emitted
        return only


@dataclass(frozen=True)
class Decision:
    """A person's decision on a hand-off, or (``expired``) that nobody decided in time.
    ``comment`` is an approval's note or a rejection's (or the expiry's) reason."""

    approved: bool
    by: str
    comment: str = ""
    expired: bool = False
    decided_at: datetime | None = None

    def record(self) -> dict[str, Any]:
        """What the run keeps of it, in its context under the step decided on."""
        found: dict[str, Any] = {"approved": self.approved, "by": self.by,
                                 "note" if self.approved else "reason": self.comment,
                                 "expired": self.expired}
        if self.decided_at is not None:
            found["decided_at"] = self.decided_at.isoformat()
        return found


class AgentTokens(Protocol):
    """Mints the signed, short-lived token a step carries to the tool gateway."""

    def mint(self, agent: str, tenant: str, tools: Sequence[str], ttl_s: float) -> str: ...


class Engine:
    """Runs loaded workflows one step at a time. A tool call may take ``tool_timeout_s``
    (a step's own ``tool_timeout_s`` wins); past it the step fails as transient.

    ``tools`` is the tool gateway (or, in tests, a plain registry); with ``tokens`` each step
    runs as its own agent (``workflow.step``) with a token scoped to the tools it declares.
    A run may make at most ``max_tool_calls_per_run`` tool calls; one that would pass it is
    ended with status ``tool_call_limit``."""

    # seconds a hand-off waits for a decision unless its step says (the worker sets it)
    approval_expiry_s: float = 86_400.0

    def __init__(self, workflows: WorkflowSet, tools: ToolCaller, *,
                 models: ModelClient | None = None, knowledge: KnowledgeBase | None = None,
                 joins: JoinStore | None = None,
                 max_steps_per_run: int = 100, record_all: bool = False,
                 tool_timeout_s: float = 30.0, tokens: AgentTokens | None = None,
                 max_tool_calls_per_run: int | None = 50,
                 clock: Callable[[], datetime] = utc_now) -> None:
        if tool_timeout_s <= 0:
            raise ConfigError(f"tool_timeout_s must be positive, not {tool_timeout_s}; set "
                              f"AGENTFABRIC_TOOL_TIMEOUT_S to the seconds one tool call may take")
        self.workflows = workflows
        self.tools = tools
        self.models = models
        self.knowledge = knowledge
        self.joins: JoinStore = joins or MemoryJoinStore()
        self.journal: Journal | None = None  # durable calls; the worker wires Redis
        self.cache: StepCache | None = None  # opt-in step outputs; the worker wires Redis
        self.on_cache: CacheHook | None = None  # (workflow, step, hit) per look-up: metrics
        self.budgets = Budgets()  # tenant limits and spend; the worker wires settings, Redis
        self.max_steps_per_run = max_steps_per_run
        self.record_all = record_all
        self.tool_timeout_s = tool_timeout_s
        self.tokens = tokens
        self.max_tool_calls_per_run = max_tool_calls_per_run
        self.clock = clock
        self._check_steps()

    def _check_steps(self) -> None:
        for wf in self.workflows:
            for step in wf.steps:
                for tool in step.tool_names():
                    if tool not in self.tools.names():
                        raise ConfigError(
                            f"{wf.file}: step '{step.id}': field 'tool': no tool named "
                            f"'{tool}' is registered (known: {', '.join(self.tools.names())})")
                for name in step.workflow_names():
                    if name not in self.workflows.names():
                        raise ConfigError(
                            f"{wf.file}: step '{step.id}': field 'workflow': workflow "
                            f"'{name}' is not loaded (loaded: "
                            f"{', '.join(self.workflows.names())})")
                if step.uses_knowledge() and self.knowledge is None:
                    raise ConfigError(f"{wf.file}: step '{step.id}' looks things up, but no "
                                      f"knowledge base is configured")
                models = list(step.model_names())
                if models and self.models is None:
                    raise ConfigError(f"{wf.file}: step '{step.id}' calls a model, but no "
                                      f"model client is configured")
                if self.models is not None:
                    try:
                        self.models.check(models)
                    except ConfigError as exc:
                        raise ConfigError(f"{wf.file}: step '{step.id}': {exc}") from exc

    def is_pure(self, msg: StepMessage) -> bool:
        """Whether running ``msg`` has no effect beyond the messages it returns: a pure step
        kind (transform, branch), not cached, not recorded, and neither in a parallel branch
        (it may join) nor in a called workflow (it may return to its caller)."""
        if self.record_all or msg.frames or msg.parent is not None:
            return False
        try:
            wf = self.workflows.get(msg.workflow, msg.workflow_version)
            step = wf.step(msg.step)
        except (UnknownWorkflowError, UnknownStepError):  # run_step says what is wrong
            return False
        return step.pure and step.cache is None and not wf.record

    def start(self, event: TriggerEvent, trace_parent: str | None = None) -> list[StepMessage]:
        """The first step message of every workflow this event starts."""
        now = self.clock()
        return [first_message(wf, event, now, trace_parent)
                for wf in self.workflows.starting(event)]

    def tool_timeout_for(self, step: StepSpec) -> float:
        """Seconds one tool call of ``step`` may take: its own setting, else the engine's."""
        return self.tool_timeout_s if step.tool_timeout_s is None else step.tool_timeout_s

    async def advance(self, msg: StepMessage) -> Emitted:
        """Run a step that emits exactly one message and return it."""
        return (await self.run_step(msg)).next

    async def run_step(self, msg: StepMessage, *,
                       replay: list[dict[str, Any]] | None = None,
                       journal_key: str | None = None,
                       approval_of: str | None = None) -> StepRun:
        """Run one step. With ``replay``, model and tool calls are answered from that
        recording (and the deadline is not checked: a replay runs after the fact).
        Otherwise calls already journaled under ``journal_key`` (default: the message's
        idempotency key) are answered from the journal, and new ones are journaled.
        A tool call that needs approval parks the run (a ``tool_approval`` hand-off);
        ``approval_of`` is the hand-off whose approval runs the step again, if any."""
        wf = self.workflows.get(msg.workflow, msg.workflow_version)
        step = wf.step(msg.step)
        if len(msg.path) >= self.max_steps_per_run:
            raise PermanentError(
                f"run {msg.run_id} has executed {len(msg.path)} steps, the limit "
                f"(AGENTFABRIC_MAX_STEPS_PER_RUN); check the workflow for a loop")
        now = self.clock()
        if replay is None and msg.deadline is not None and now > msg.deadline:
            raise PermanentError(f"run {msg.run_id} passed its deadline "
                                 f"{msg.deadline.isoformat()} before step '{step.id}'; raise "
                                 f"the workflow's timeout_s or find what slowed it")
        calls: InteractionLog | Replay = (
            InteractionLog(self.models, self.tools, self.knowledge, step=step.id,
                           tool_timeout_s=self.tool_timeout_for(step), journal=self.journal,
                           journal_key=journal_key or msg.idempotency_key)
            if replay is None
            else Replay(self.tools, replay, step.id))
        models = calls if replay is not None else self.budgets.guard(calls, wf.budget, msg,
                                                                      self.models)
        ctx = StepContext(message=msg, scope=step_scope(msg), tools=calls, models=models,
                          knowledge=calls, agent=f"{msg.workflow}.{step.id}",
                          token=self._token(msg, step),
                          max_tool_calls_per_run=self.max_tool_calls_per_run)
        try:
            outcome = await run_cached(None if replay is not None else self.cache, step, ctx,
                                       calls.entries, self.on_cache)
        except ApprovalRequired as exc:  # parked: the step runs again once approved
            return StepRun([self._tool_hand_off(msg, exc, approval_of)], None)
        except ToolCallLimitExceeded as exc:
            return StepRun(await self._stop(wf, step, msg, "tool_call_limit", exc.reason,
                                            ctx.tool_calls, calls.entries), None)
        except BudgetExceeded as exc:
            return StepRun(await self._stop(wf, step, msg, "budget_exceeded", exc.reason,
                                            ctx.tool_calls, calls.entries), None)
        if isinstance(calls, Replay):
            calls.finished()
        recording = None
        if replay is None and (wf.record or self.record_all):
            envelope, schema_id = seal(msg)
            recording = StepRecording(
                run_id=msg.run_id, workflow=msg.workflow, workflow_version=msg.workflow_version,
                step=step.id, idempotency_key=msg.idempotency_key, envelope=envelope,
                envelope_schema=schema_id,
                interactions=calls.entries, output=output_bytes(outcome.output),
                recorded_at=now)
        return StepRun(await self._after(wf, step, msg, outcome), outcome.output, recording)

    def _token(self, msg: StepMessage, step: StepSpec) -> str:
        tools = list(step.tool_names())
        if self.tokens is None or not tools:
            return ""
        ttl = (self.tool_timeout_for(step) * 4 + 60) if step.timeout_s is None else (
            step.timeout_s + 60)
        return self.tokens.mint(f"{msg.workflow}.{step.id}", msg.tenant, tools, ttl)

    async def _stop(self, wf: Workflow, step: StepSpec, msg: StepMessage, status: str,
                    reason: str, tool_calls: int = 0,
                    calls: Sequence[Mapping[str, Any]] = ()) -> list[Emitted]:
        """End the run at ``step`` with ``status``; its output says why. The model calls
        the step made before it stopped (``calls``, its interaction entries) count in the
        run's usage: they were made and paid for."""
        spent = Usage(steps=1, tool_calls=tool_calls)
        for entry in calls:
            if entry.get("kind") == "model" and isinstance(entry.get("usage"), Mapping):
                spent += Usage.model_validate(entry["usage"]).model_copy(
                    update={"steps": 0, "tool_calls": 0})
        step_usage = {**msg.step_usage, step.id: msg.step_usage.get(step.id, Usage()) + spent}
        done = msg.model_copy(update={
            "context": {**msg.context, step.id: {"status": status, "reason": reason}},
            "path": [*msg.path, step.id], "usage": msg.usage + spent,
            "step_usage": step_usage})
        return await self._finish(wf, done, status=status,
                                  output={"status": status, "step": step.id, "reason": reason})

    async def _after(self, wf: Workflow, step: StepSpec, msg: StepMessage,
                     outcome: StepOutcome) -> list[Emitted]:
        spent = outcome.usage.model_copy(update={"steps": 1})  # one step, whatever it used
        step_usage = {**msg.step_usage, step.id: msg.step_usage.get(step.id, Usage()) + spent}
        usage = msg.usage + spent
        if outcome.hand_off is not None:
            return [self._hand_off(msg.model_copy(update={"usage": usage,
                                                          "step_usage": step_usage}),
                                   outcome.hand_off, outcome.output)]
        done = msg.model_copy(update={"context": {**msg.context, step.id: outcome.output},
                                      "path": [*msg.path, step.id], "usage": usage,
                                      "step_usage": step_usage,
                                      "degraded": [*msg.degraded, *outcome.degraded]})
        if outcome.call is not None:
            return [self._call(done, step.id, outcome.call)]
        if outcome.fan_out is not None:
            frames = [Frame(step=step.id, visit=len(msg.path), branch=head,
                            total=len(outcome.fan_out.branches), join=outcome.fan_out.join)
                      for head in outcome.fan_out.branches]
            return [self._move(done, frame.branch, [*msg.frames, frame]) for frame in frames]
        return await self._continue(wf, step, done, outcome.next_step)

    async def _continue(self, wf: Workflow, step: StepSpec, done: StepMessage,
                        next_step: str | None) -> list[Emitted]:
        target = next_step or step.next or wf.following(step.id)
        if done.frames and target == done.frames[-1].join:
            return await self._arrive(done, target)
        if target == END:
            if done.frames:
                frame = done.frames[-1]
                raise PermanentError(
                    f"branch '{frame.branch}' of parallel step '{frame.step}' reached the end "
                    f"of workflow '{wf.name}' without joining; end each branch with "
                    f"next: {frame.join}")
            return await self._finish(wf, done)
        return [self._move(done, target)]

    def _move(self, done: StepMessage, target: str,
              frames: list[Frame] | None = None) -> StepMessage:
        frames = done.frames if frames is None else frames
        key = idempotency_key(done.run_id, target, len(done.path), frames)
        return done.model_copy(update={
            "step": target, "attempt": 1, "idempotency_key": key, "frames": frames,
            "trace_parent": trace_parent_for(done.run_id, done.idempotency_key,
                                             done.trace_parent, done.attempt)})

    async def _arrive(self, done: StepMessage, join: str) -> list[Emitted]:
        frame = done.frames[-1]
        own = done.path[frame.visit + 1:]  # the steps this branch ran since the fan-out
        branch = {"path": own, "context": {name: done.context[name] for name in own},
                  "step_usage": {name: done.step_usage[name].model_dump() for name in own},
                  "degraded": done.degraded}
        arrived = await self.joins.arrive(f"{done.run_id}:{frame.step}:{frame.visit}",
                                          frame.branch, canonical_json(branch), frame.total)
        if arrived is None:
            return []
        parallel = self.workflows.get(done.workflow, done.workflow_version).step(frame.step)
        order = parallel.branches if isinstance(parallel, ParallelStep) else sorted(arrived)
        # Start from the state at the fan-out; each branch owns only the steps it ran, so an
        # older output of a step (an earlier loop pass) never overwrites a fresh one.
        context = dict(done.context)
        step_usage = dict(done.step_usage)
        path = done.path[:frame.visit + 1]
        degraded: dict[str, None] = {}  # every branch carries the notes from before the fan-out
        for head in order:
            part = json.loads(arrived[head])
            degraded.update(dict.fromkeys(part.get("degraded", ())))
            path.extend(part["path"])
            context.update(part["context"])
            for name, used in part["step_usage"].items():
                step_usage[name] = Usage.model_validate(used)
        joined = done.model_copy(update={"context": context, "path": path,
                                         "step_usage": step_usage, "usage": _total(step_usage),
                                         "frames": done.frames[:-1],
                                         "degraded": list(degraded)})
        return [self._move(joined, join)]

    def _call(self, done: StepMessage, step: str, call: SubWorkflowCall) -> StepMessage:
        depth, parent = 1, done.parent
        while parent is not None:
            depth += 1
            parent = unseal(parent.envelope, parent.envelope_schema, StepMessage).parent
        if depth > MAX_CALL_DEPTH:
            raise PermanentError(f"workflow calls are nested more than {MAX_CALL_DEPTH} deep at "
                                 f"step '{step}'; check for workflows that call each other")
        child = self.workflows.latest(call.workflow)
        envelope, schema_id = seal(done)
        run_id = str(uuid.uuid5(RUN_NAMESPACE, f"{done.run_id}/{done.idempotency_key}"))
        key = idempotency_key(run_id, child.first_step, 0)
        return StepMessage(
            run_id=run_id, workflow=child.name, workflow_version=child.version,
            step=child.first_step, tenant=done.tenant,
            trace_parent=trace_parent_for(run_id, done.idempotency_key, done.trace_parent,
                                          done.attempt), idempotency_key=key,
            input=call.input, context={}, event_id=done.event_id, source=done.source,
            event_type=done.event_type, started_at=self.clock(), deadline=done.deadline,
            parent=ParentCall(envelope=envelope, envelope_schema=schema_id, step=step))

    async def _finish(self, wf: Workflow, done: StepMessage, status: str = "completed",
                      output: Any = None) -> list[Emitted]:
        if output is None:
            last = done.context.get(done.path[-1]) if done.path else None
            output = last if wf.output is None else wf.output.render(step_scope(done))
        result = RunResult(
            run_id=done.run_id, workflow=done.workflow, workflow_version=done.workflow_version,
            tenant=done.tenant, status=status, output=output, context=done.context,
            usage=done.usage, step_usage=done.step_usage, path=done.path,
            event_id=done.event_id, source=done.source, event_type=done.event_type,
            trace_parent=done.trace_parent, started_at=done.started_at,
            finished_at=self.clock(), degraded=done.degraded)
        if done.parent is None:
            return [result]
        caller = unseal(done.parent.envelope, done.parent.envelope_schema, StepMessage)
        caller_wf = self.workflows.get(caller.workflow, caller.workflow_version)
        step = caller_wf.step(done.parent.step)
        step_usage = {**caller.step_usage,
                      step.id: caller.step_usage.get(step.id, Usage()) + done.usage}
        resumed = caller.model_copy(update={
            "context": {**caller.context, step.id: output}, "step_usage": step_usage,
            "usage": caller.usage + done.usage, "degraded": [*caller.degraded, *done.degraded]})
        return [result, *await self._continue(caller_wf, step, resumed, None)]

    async def resume(self, hand_off: HandOff, decision: Decision) -> list[Emitted]:
        """Continue a run a person has decided on. An approved run goes on (a tool call that
        waited runs its step again: the gateway finds the grant to that call); a rejected or
        expired one goes to the approval step's ``on_reject``, else ends as ``rejected`` or
        ``expired`` with the reason as its output. Time spent waiting does not count
        against the run's deadline."""
        msg = unseal(hand_off.envelope, hand_off.envelope_schema, StepMessage)
        wf = self.workflows.get(msg.workflow, msg.workflow_version)
        step = wf.step(msg.step)
        if msg.deadline is not None and decision.decided_at is not None \
                and decision.decided_at > hand_off.created_at:
            msg = msg.model_copy(update={
                "deadline": msg.deadline + (decision.decided_at - hand_off.created_at)})
        if decision.approved and hand_off.kind == "tool_approval":
            return [msg]
        done = msg.model_copy(update={"context": {**msg.context, step.id: decision.record()},
                                      "path": [*msg.path, step.id]})
        if decision.approved:
            return await self._continue(wf, step, done, None)
        status = "expired" if decision.expired else "rejected"
        target = step.on_reject if isinstance(step, ApprovalStep) else END
        if target != END:
            return [self._move(done, target)]
        if done.frames:
            raise PermanentError(
                f"step '{step.id}' was {status} inside branch '{done.frames[-1].branch}' of "
                f"parallel step '{done.frames[-1].step}', and ending the run there would "
                f"strand the other branches; set on_reject to a step that reaches the join")
        output = {"status": status, "step": step.id, "reason": decision.comment,
                  "by": decision.by}
        if hand_off.tool is not None:
            output["tool"] = hand_off.tool
        return await self._finish(wf, done, status=status, output=output)

    def _hand_off(self, msg: StepMessage, request: HandOffRequest, detail: Any) -> HandOff:
        transcript = detail.get("transcript", []) if isinstance(detail, dict) else []
        return self._park(msg, request.kind, request.reason, msg.idempotency_key,
                          request.expires_s, transcript=transcript)

    def _tool_hand_off(self, msg: StepMessage, request: ApprovalRequired,
                       approval_of: str | None) -> HandOff:
        """The run waits for approval of one tool call; the hand-off holds the message as it
        came, so an approval runs the same step again (its calls answered from the journal
        up to the approved one). Its id is new for each run of the step, so a call asking
        again after an approval is a new request, never one already decided."""
        after = f":after:{approval_of}" if approval_of else ""
        return self._park(msg, "tool_approval", request.reason,
                          f"tool_approval:{request.call_key}{after}", request.expires_s,
                          tool=request.tool, call_key=request.call_key)

    def _park(self, msg: StepMessage, kind: str, reason: str, basis: str,
              expires_s: float | None, *, transcript: list[Any] | None = None,
              tool: str | None = None, call_key: str | None = None) -> HandOff:
        envelope, schema_id = seal(msg)
        now = self.clock()
        return HandOff(
            hand_off_id=str(uuid.uuid5(RUN_NAMESPACE, basis)), kind=kind, reason=reason,
            run_id=msg.run_id, workflow=msg.workflow, workflow_version=msg.workflow_version,
            step=msg.step, tenant=msg.tenant, envelope=envelope, envelope_schema=schema_id,
            transcript=transcript or [], created_at=now,
            expires_at=now + timedelta(seconds=expires_s or self.approval_expiry_s),
            tool=tool, call_key=call_key)
