"""The workflow engine: pure functions of a message, no Kafka and no state between calls.

``start`` turns a trigger event into the first step message of each workflow it starts;
``advance`` runs one step of a run and returns the next step message or the run result.
Run ids derive from the event, so a redelivered trigger yields the same runs and the
same idempotency keys, which the step workers use to dedupe.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agentfabric.errors import ConfigError, PermanentError
from schemas.models import (
    HandOff,
    RunResult,
    StepMessage,
    StepRecording,
    TriggerEvent,
    Usage,
    utc_now,
)
from schemas.serde import SCHEMA_HEADER, encode
from tools.registry import ToolRegistry

from .models import ModelClient
from .recording import InteractionLog, Replay, output_bytes
from .steps import END, StepContext, StepOutcome, StepSpec
from .workflow import Workflow, WorkflowSet, step_scope

__all__ = ["RUN_NAMESPACE", "Engine", "StepRun", "idempotency_key", "run_id_for",
           "trace_parent_for"]

RUN_NAMESPACE = uuid.UUID("6f1c2b1e-8f0a-4e57-9a43-0c0f3b8e5d21")


def run_id_for(event: TriggerEvent, workflow: str) -> str:
    """The same event and workflow always give the same run id."""
    basis = "\x1f".join((event.tenant, event.source, event.event_id, workflow))
    return str(uuid.uuid5(RUN_NAMESPACE, basis))


def idempotency_key(run_id: str, step: str, visit: int) -> str:
    """Unique per visit of a step in a run (a loop visits a step more than once)."""
    return f"{run_id}:{step}:{visit}"


def trace_parent_for(run_id: str, key: str, incoming: str | None = None) -> str:
    """A W3C traceparent: the incoming trace id if any, else one derived from the run."""
    parts = (incoming or "").split("-")
    trace_id = parts[1] if len(parts) == 4 and len(parts[1]) == 32 else uuid.UUID(run_id).hex
    span_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"00-{trace_id}-{span_id}-01"


def _add_usage(total: Usage, delta: Usage) -> Usage:
    return Usage(input_tokens=total.input_tokens + delta.input_tokens,
                 output_tokens=total.output_tokens + delta.output_tokens,
                 cost_usd=round(total.cost_usd + delta.cost_usd, 10),
                 steps=total.steps + 1,
                 tool_calls=total.tool_calls + delta.tool_calls)


@dataclass
class StepRun:
    """What running one step gave: where the run goes, the step's output, its recording."""

    next: StepMessage | RunResult | HandOff
    output: Any
    recording: StepRecording | None = None


class Engine:
    """Runs loaded workflows one step at a time."""

    def __init__(self, workflows: WorkflowSet, tools: ToolRegistry, *,
                 models: ModelClient | None = None, max_steps_per_run: int = 100,
                 record_all: bool = False, clock: Callable[[], datetime] = utc_now) -> None:
        self.record_all = record_all
        self.workflows = workflows
        self.tools = tools
        self.models = models
        self.max_steps_per_run = max_steps_per_run
        self.clock = clock
        self._check_tools()

    def _check_tools(self) -> None:
        for wf in self.workflows:
            for step in wf.steps:
                for tool in step.tool_names():
                    if tool not in self.tools.names():
                        raise ConfigError(
                            f"{wf.file}: step '{step.id}': field 'tool': no tool named "
                            f"'{tool}' is registered (known: {', '.join(self.tools.names())})")
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

    async def advance(self, msg: StepMessage) -> StepMessage | RunResult | HandOff:
        """Run the step ``msg`` names; return the next step's message, the run's result, or
        a hand-off of the run to a person."""
        return (await self.run_step(msg)).next

    async def run_step(self, msg: StepMessage, *,
                       replay: list[dict[str, Any]] | None = None) -> StepRun:
        """Run one step. With ``replay``, model and tool calls are answered from that
        recording (and the deadline is not checked: a replay runs after the fact)."""
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
            InteractionLog(self.models, self.tools) if replay is None
            else Replay(self.tools, replay, step.id))
        outcome = await step.run(StepContext(message=msg, scope=step_scope(msg), tools=calls,
                                             models=calls))
        if isinstance(calls, Replay):
            calls.finished()
        recording = None
        if replay is None and (wf.record or self.record_all):
            envelope, headers = encode(msg)
            recording = StepRecording(
                run_id=msg.run_id, workflow=msg.workflow, workflow_version=msg.workflow_version,
                step=step.id, idempotency_key=msg.idempotency_key, envelope=envelope,
                envelope_schema=dict(headers)[SCHEMA_HEADER].decode(),
                interactions=calls.entries, output=output_bytes(outcome.output),
                recorded_at=now)
        return StepRun(self._next(wf, step, msg, outcome), outcome.output, recording)

    def _next(self, wf: Workflow, step: StepSpec, msg: StepMessage,
              outcome: StepOutcome) -> StepMessage | RunResult | HandOff:
        usage = _add_usage(msg.usage, outcome.usage)
        step_usage = {**msg.step_usage,
                      step.id: _add_usage(msg.step_usage.get(step.id, Usage()),
                                          outcome.usage)}
        if outcome.hand_off is not None:
            return self._hand_off(msg.model_copy(update={"usage": usage,
                                                         "step_usage": step_usage}),
                                  outcome.hand_off, outcome.output)
        context = {**msg.context, step.id: outcome.output}
        path = [*msg.path, step.id]
        target = outcome.next_step or step.next or wf.following(step.id)
        if target == END:
            return self._result(wf, msg, context, path, usage, step_usage, outcome.output)
        key = idempotency_key(msg.run_id, target, len(path))
        return msg.model_copy(update={
            "step": target, "attempt": 1, "idempotency_key": key, "context": context,
            "path": path, "usage": usage, "step_usage": step_usage,
            "trace_parent": trace_parent_for(msg.run_id, key, msg.trace_parent)})

    def _hand_off(self, msg: StepMessage, reason: str, detail: Any) -> HandOff:
        envelope, headers = encode(msg)
        transcript = detail.get("transcript", []) if isinstance(detail, dict) else []
        return HandOff(
            hand_off_id=str(uuid.uuid5(RUN_NAMESPACE, msg.idempotency_key)), kind="hand_off",
            reason=reason, run_id=msg.run_id, workflow=msg.workflow,
            workflow_version=msg.workflow_version, step=msg.step, tenant=msg.tenant,
            envelope=envelope, envelope_schema=dict(headers)[SCHEMA_HEADER].decode(),
            transcript=transcript, created_at=self.clock())

    def _result(self, wf: Workflow, msg: StepMessage, context: dict[str, object],
                path: list[str], usage: Usage, step_usage: dict[str, Usage],
                last_output: object) -> RunResult:
        finished = msg.model_copy(update={"context": context, "path": path})
        output = last_output if wf.output is None else wf.output.render(step_scope(finished))
        return RunResult(
            run_id=msg.run_id, workflow=msg.workflow, workflow_version=msg.workflow_version,
            tenant=msg.tenant, status="completed", output=output, context=context,
            usage=usage, step_usage=step_usage, path=path, event_id=msg.event_id,
            source=msg.source,
            event_type=msg.event_type, trace_parent=msg.trace_parent,
            started_at=msg.started_at, finished_at=self.clock())
