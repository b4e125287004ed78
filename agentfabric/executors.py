"""The workflow engine wired into the runtime's executor protocol (``streams.executor``):
the router (trigger -> first step of each workflow it starts) and one executor per step.

The engine takes and returns models; these executors say which topic each model goes to,
how a record is deduped, how long a step may run and how a transient failure is retried.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka import ConsumerRecord

from agents.engine import Emitted, Engine, root_run_id
from schemas.models import HandOff, RunResult, StepMessage, TriggerEvent
from schemas.serde import decode
from streams.codec import decode_trigger, trace_header, trace_of
from streams.executor import Emit, Job
from streams.topics import TopicNames

from .errors import AgentFabricError, TransientError
from .settings import Settings

__all__ = ["RouterExecutor", "StepExecutor", "executors_for"]


class RouterExecutor:
    """Reads every trigger topic; starts the runs of each workflow an event triggers."""

    def __init__(self, engine: Engine, names: TopicNames, settings: Settings) -> None:
        self.engine = engine
        self.names = names
        self.name = "router"
        self.group = names.router_group
        self.topics = [names.trigger(s) for s in engine.workflows.sources()]
        self.max_in_flight = settings.max_in_flight
        self.dlq_topic = names.dlq
        self.timeout_s = settings.step_timeout_s

    def decode(self, record: ConsumerRecord) -> Job:
        source = self.names.source_of(record.topic) or ""
        event = decode_trigger(record, source)
        return Job(message=event, dedupe_key=f"trigger:{event.tenant}:{event.source}:"
                                             f"{event.event_id}",
                   timeout_s=self.timeout_s, trace_parent=trace_of(record))

    async def execute(self, job: Job) -> Sequence[Emit]:
        assert isinstance(job.message, TriggerEvent)
        return [Emit(self.names.step(m.workflow, m.step), m.run_id, m, trace_header(m))
                for m in self.engine.start(job.message, job.trace_parent)]

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
        self.default_timeout_s = settings.step_timeout_s
        spec = engine.workflows.step_spec(workflow, step)
        declared = spec.max_in_flight if spec is not None else None
        self.max_in_flight = declared or settings.max_in_flight

    def _timeout(self, message: StepMessage) -> float:
        try:
            spec = self.engine.workflows.get(message.workflow, message.workflow_version)
            timeout = spec.step(message.step).timeout_s
        except AgentFabricError:  # unknown workflow or step: execute says so in a dead letter
            timeout = None
        return timeout or self.default_timeout_s

    def decode(self, record: ConsumerRecord) -> Job:
        message = decode(record.value, record.headers, StepMessage)
        return Job(message=message, dedupe_key=f"step:{message.idempotency_key}:"
                                               f"{message.attempt}",
                   timeout_s=self._timeout(message), subject=message,
                   trace_parent=message.trace_parent)

    async def execute(self, job: Job) -> Sequence[Emit]:
        message = job.message
        assert isinstance(message, StepMessage)
        run = await self.engine.run_step(message)
        out = [self._route(emitted) for emitted in run.emitted]
        if run.recording is not None:
            out.append(Emit(self.names.recordings, root_run_id(message), run.recording))
        return out

    def retry(self, job: Job, error: TransientError) -> Emit | None:
        message = job.message
        assert isinstance(message, StepMessage)
        if message.attempt >= self.max_attempts:
            return None
        again = message.model_copy(update={"attempt": message.attempt + 1})
        return Emit(self.names.step(again.workflow, again.step), again.run_id, again,
                    trace_header(again))

    def _route(self, after: Emitted) -> Emit:
        if isinstance(after, RunResult):
            return Emit(self.names.results(after.workflow), after.run_id, after)
        if isinstance(after, HandOff):
            return Emit(self.names.approvals, after.run_id, after)
        return Emit(self.names.step(after.workflow, after.step), after.run_id, after,
                    trace_header(after))


def executors_for(engine: Engine, settings: Settings, workflows: Sequence[str], *,
                  router: bool = True) -> list[RouterExecutor | StepExecutor]:
    """The router (if asked) and one executor per step of ``workflows``."""
    names = TopicNames(settings.topic_prefix)
    found: list[RouterExecutor | StepExecutor] = []
    if router:
        found.append(RouterExecutor(engine, names, settings))
    for name in workflows:
        found.extend(StepExecutor(engine, names, settings, name, step)
                     for step in engine.workflows.step_ids(name))
    return found
