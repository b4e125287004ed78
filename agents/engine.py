"""The workflow engine: functions of a message, holding no run state between calls.

``start`` turns a trigger event into the first step message of each workflow it starts;
``run_step`` runs one step of a run and returns what it emits: the next step's message,
the messages of parallel branches or of a called workflow, the run's result (and the
caller's continuation), or a hand-off to a person. The only shared state is the join
store of parallel fan-outs. Run ids derive from the event, so a redelivered trigger
yields the same runs and idempotency keys, which the step workers use to dedupe.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agentfabric.errors import ConfigError, PermanentError
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
from tools.registry import ToolRegistry

from .joins import JoinStore, MemoryJoinStore
from .journal import Journal
from .models import ModelClient
from .recording import InteractionLog, Replay, output_bytes
from .steps import END, StepContext, StepOutcome, StepSpec
from .steps.base import HandOffRequest, SubWorkflowCall
from .steps.flow import ApprovalStep, ParallelStep
from .workflow import Workflow, WorkflowSet, step_scope

__all__ = [
    "MAX_CALL_DEPTH",
    "RUN_NAMESPACE",
    "Decision",
    "Emitted",
    "Engine",
    "StepRun",
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


def idempotency_key(run_id: str, step: str, visit: int, frames: Sequence[Frame] = ()) -> str:
    """Unique per visit of a step in a run (a loop visits a step more than once) and per
    parallel branch it runs in."""
    branches = "".join(f"/{f.branch}" for f in frames)
    return f"{run_id}:{step}{branches}:{visit}"


def trace_parent_for(run_id: str, key: str, incoming: str | None = None) -> str:
    """A W3C traceparent: the incoming trace id if any, else one derived from the run."""
    parts = (incoming or "").split("-")
    trace_id = parts[1] if len(parts) == 4 and len(parts[1]) == 32 else uuid.UUID(run_id).hex
    span_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span_id}-01"


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
    """A person's decision on a hand-off."""

    approved: bool
    by: str
    comment: str = ""


class Engine:
    """Runs loaded workflows one step at a time. A tool call may take ``tool_timeout_s``
    (a step's own ``tool_timeout_s`` wins); past it the step fails as transient."""

    def __init__(self, workflows: WorkflowSet, tools: ToolRegistry, *,
                 models: ModelClient | None = None, knowledge: KnowledgeBase | None = None,
                 joins: JoinStore | None = None,
                 max_steps_per_run: int = 100, record_all: bool = False,
                 tool_timeout_s: float = 30.0,
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
        self.max_steps_per_run = max_steps_per_run
        self.record_all = record_all
        self.tool_timeout_s = tool_timeout_s
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

    def start(self, event: TriggerEvent, trace_parent: str | None = None) -> list[StepMessage]:
        """The first step message of every workflow this event starts."""
        now = self.clock()
        messages = []
        for wf in self.workflows.starting(event):
            run_id = run_id_for(event, wf.name)
            key = idempotency_key(run_id, wf.first_step, 0)
            messages.append(StepMessage(
                run_id=run_id, workflow=wf.name, workflow_version=wf.version,
                step=wf.first_step, tenant=event.tenant,
                trace_parent=trace_parent_for(run_id, key, trace_parent),
                idempotency_key=key, input=event.payload, context={},
                event_id=event.event_id, source=event.source, event_type=event.event_type,
                started_at=now,
                deadline=now + timedelta(seconds=wf.timeout_s) if wf.timeout_s else None))
        return messages

    def tool_timeout_for(self, step: StepSpec) -> float:
        """Seconds one tool call of ``step`` may take: its own setting, else the engine's."""
        return self.tool_timeout_s if step.tool_timeout_s is None else step.tool_timeout_s

    async def advance(self, msg: StepMessage) -> Emitted:
        """Run a step that emits exactly one message and return it."""
        return (await self.run_step(msg)).next

    async def run_step(self, msg: StepMessage, *,
                       replay: list[dict[str, Any]] | None = None,
                       journal_key: str | None = None) -> StepRun:
        """Run one step. With ``replay``, model and tool calls are answered from that
        recording (and the deadline is not checked: a replay runs after the fact).
        Otherwise calls already journaled under ``journal_key`` (default: the message's
        idempotency key) are answered from the journal, and new ones are journaled."""
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
        outcome = await step.run(StepContext(message=msg, scope=step_scope(msg), tools=calls,
                                             models=calls, knowledge=calls))
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
                                      "step_usage": step_usage})
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
            "trace_parent": trace_parent_for(done.run_id, key, done.trace_parent)})

    async def _arrive(self, done: StepMessage, join: str) -> list[Emitted]:
        frame = done.frames[-1]
        own = done.path[frame.visit + 1:]  # the steps this branch ran since the fan-out
        branch = {"path": own, "context": {name: done.context[name] for name in own},
                  "step_usage": {name: done.step_usage[name].model_dump() for name in own}}
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
        for head in order:
            part = json.loads(arrived[head])
            path.extend(part["path"])
            context.update(part["context"])
            for name, used in part["step_usage"].items():
                step_usage[name] = Usage.model_validate(used)
        joined = done.model_copy(update={"context": context, "path": path,
                                         "step_usage": step_usage, "usage": _total(step_usage),
                                         "frames": done.frames[:-1]})
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
            trace_parent=trace_parent_for(run_id, key, done.trace_parent), idempotency_key=key,
            input=call.input, context={}, event_id=done.event_id, source=done.source,
            event_type=done.event_type, started_at=self.clock(), deadline=done.deadline,
            parent=ParentCall(envelope=envelope, envelope_schema=schema_id, step=step))

    async def _finish(self, wf: Workflow, done: StepMessage, status: str = "completed",
                      ) -> list[Emitted]:
        last = done.context.get(done.path[-1]) if done.path else None
        output = last if wf.output is None else wf.output.render(step_scope(done))
        result = RunResult(
            run_id=done.run_id, workflow=done.workflow, workflow_version=done.workflow_version,
            tenant=done.tenant, status=status, output=output, context=done.context,
            usage=done.usage, step_usage=done.step_usage, path=done.path,
            event_id=done.event_id, source=done.source, event_type=done.event_type,
            trace_parent=done.trace_parent, started_at=done.started_at,
            finished_at=self.clock())
        if done.parent is None:
            return [result]
        caller = unseal(done.parent.envelope, done.parent.envelope_schema, StepMessage)
        caller_wf = self.workflows.get(caller.workflow, caller.workflow_version)
        step = caller_wf.step(done.parent.step)
        step_usage = {**caller.step_usage,
                      step.id: caller.step_usage.get(step.id, Usage()) + done.usage}
        resumed = caller.model_copy(update={
            "context": {**caller.context, step.id: output}, "step_usage": step_usage,
            "usage": caller.usage + done.usage})
        return [result, *await self._continue(caller_wf, step, resumed, None)]

    async def resume(self, hand_off: HandOff, decision: Decision) -> list[Emitted]:
        """Continue a run a person has decided on: approved runs go on, rejected ones go to
        the step's ``on_reject`` (the run ends as rejected by default)."""
        msg = unseal(hand_off.envelope, hand_off.envelope_schema, StepMessage)
        wf = self.workflows.get(msg.workflow, msg.workflow_version)
        step = wf.step(msg.step)
        done = msg.model_copy(update={
            "context": {**msg.context, step.id: {"approved": decision.approved,
                                                 "by": decision.by,
                                                 "comment": decision.comment}},
            "path": [*msg.path, step.id]})
        if decision.approved:
            return await self._continue(wf, step, done, None)
        target = step.on_reject if isinstance(step, ApprovalStep) else END
        if target != END:
            return [self._move(done, target)]
        if done.frames:
            raise PermanentError(
                f"step '{step.id}' was rejected inside branch '{done.frames[-1].branch}' of "
                f"parallel step '{done.frames[-1].step}', and ending the run there would "
                f"strand the other branches; set on_reject to a step that reaches the join")
        return await self._finish(wf, done, status="rejected")

    def _hand_off(self, msg: StepMessage, request: HandOffRequest, detail: Any) -> HandOff:
        envelope, schema_id = seal(msg)
        transcript = detail.get("transcript", []) if isinstance(detail, dict) else []
        return HandOff(
            hand_off_id=str(uuid.uuid5(RUN_NAMESPACE, msg.idempotency_key)), kind=request.kind,
            reason=request.reason, run_id=msg.run_id, workflow=msg.workflow,
            workflow_version=msg.workflow_version, step=msg.step, tenant=msg.tenant,
            envelope=envelope, envelope_schema=schema_id, transcript=transcript,
            created_at=self.clock())
