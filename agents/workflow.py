"""A loaded workflow: its trigger, its steps in order, and the set of loaded workflows.

Steps run in file order unless a step names ``next`` (or a branch case does);
``end`` finishes the run. The run's output is the workflow's ``output`` template
rendered at the end, or the last step's output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agentfabric.errors import UnknownStepError, UnknownWorkflowError, UnroutableEventError
from agents.expr import Expression
from agents.template import Template
from schemas.models import EVENT_TYPE_PATTERN, NAME_PATTERN, StepMessage, TriggerEvent

from .budgets import BudgetSpec
from .steps.base import END, StepSpec

__all__ = [
    "RESERVED_NAMES",
    "SCOPE_NAMES",
    "TriggerSpec",
    "Workflow",
    "WorkflowSet",
    "event_scope",
    "step_scope",
]

RESERVED_NAMES = frozenset({"triggers", "results", "retry", "dlq", "approvals", "router"})
SCOPE_NAMES = ("input", "steps", "run", "event")


class TriggerSpec(BaseModel):
    """Which events start the workflow."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(pattern=NAME_PATTERN)
    event_types: list[str] = Field(min_length=1)
    when: str | None = Field(default=None, description="Extra condition on input and event.")

    def model_post_init(self, _context: Any) -> None:
        import re

        for event_type in self.event_types:
            if not re.match(EVENT_TYPE_PATTERN, event_type):
                raise ValueError(f"event type '{event_type}' must match {EVENT_TYPE_PATTERN}")


@dataclass
class Workflow:
    name: str
    version: int
    description: str
    trigger: TriggerSpec
    steps: list[StepSpec]
    file: str
    output: Template | None = None
    when: Expression | None = None
    timeout_s: float | None = None
    record: bool = False
    input_schema: dict[str, Any] | None = None  # JSON schema of the run's input
    budget: BudgetSpec | None = None  # tokens and cost one run may use
    _by_id: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {step.id: i for i, step in enumerate(self.steps)}

    @property
    def first_step(self) -> str:
        return self.steps[0].id

    def step(self, step_id: str) -> StepSpec:
        try:
            return self.steps[self._by_id[step_id]]
        except KeyError:
            raise UnknownStepError(
                f"workflow '{self.name}' v{self.version} has no step '{step_id}' (steps: "
                f"{', '.join(self._by_id)}); the message was produced for another version "
                f"or by mistake") from None

    def following(self, step_id: str) -> str:
        """The step after ``step_id`` in file order, or ``end``."""
        index = self._by_id[step_id] + 1
        return self.steps[index].id if index < len(self.steps) else END

    def accepts(self, event: TriggerEvent) -> bool:
        if event.source != self.trigger.source or event.event_type not in self.trigger.event_types:
            return False
        return self.when is None or bool(self.when.evaluate(event_scope(event)))


def event_scope(event: TriggerEvent) -> dict[str, Any]:
    return {"input": event.payload, "event": {
        "id": event.event_id, "type": event.event_type, "source": event.source,
        "tenant": event.tenant, "occurred_at": event.occurred_at.isoformat()}}


def step_scope(msg: StepMessage) -> dict[str, Any]:
    """What expressions in a step may read: input, steps (earlier outputs), run, event."""
    return {
        "input": msg.input,
        "steps": msg.context,
        "run": {"id": msg.run_id, "workflow": msg.workflow, "version": msg.workflow_version,
                "tenant": msg.tenant, "attempt": msg.attempt,
                "started_at": msg.started_at.isoformat()},
        "event": {"id": msg.event_id, "type": msg.event_type, "source": msg.source,
                  "tenant": msg.tenant},
    }


class WorkflowSet:
    """Loaded workflows by name and version; new runs start on the latest version."""

    def __init__(self, workflows: Iterable[Workflow]) -> None:
        self._by_name: dict[str, dict[int, Workflow]] = {}
        for wf in workflows:
            self._by_name.setdefault(wf.name, {})[wf.version] = wf

    def __iter__(self) -> Iterator[Workflow]:
        for name in sorted(self._by_name):
            yield from (self._by_name[name][v] for v in sorted(self._by_name[name]))

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def latest(self, name: str) -> Workflow:
        versions = self._versions(name)
        return versions[max(versions)]

    def get(self, name: str, version: int) -> Workflow:
        versions = self._versions(name)
        if version not in versions:
            raise UnknownWorkflowError(
                f"workflow '{name}' version {version} is not loaded (loaded versions: "
                f"{', '.join(map(str, sorted(versions)))}); deploy that version, then replay")
        return versions[version]

    def _versions(self, name: str) -> dict[int, Workflow]:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownWorkflowError(
                f"workflow '{name}' is not loaded (loaded: {', '.join(self.names()) or 'none'})"
                f"; check the name or deploy the workflow") from None

    def sources(self) -> list[str]:
        return sorted({wf.trigger.source for wf in self})

    def step_spec(self, name: str, step_id: str) -> StepSpec | None:
        """The step ``step_id`` as the newest version of ``name`` that has it declares it."""
        versions = self._versions(name)
        for version in sorted(versions, reverse=True):
            if step_id in versions[version]._by_id:
                return versions[version].step(step_id)
        return None

    def step_ids(self, name: str) -> list[str]:
        """Every step id of every loaded version of ``name``, first-seen order."""
        ids: dict[str, None] = {}
        for version in sorted(self._versions(name)):
            ids.update(dict.fromkeys(s.id for s in self._by_name[name][version].steps))
        return list(ids)

    def starting(self, event: TriggerEvent) -> list[Workflow]:
        """The workflows (latest versions) this event starts; raises if there are none."""
        if event.workflow is not None:
            wf = self.latest(event.workflow)
            if not wf.accepts(event):
                raise UnroutableEventError(
                    f"workflow '{wf.name}' does not start on {event.event_type} events from "
                    f"{event.source} (it takes {', '.join(wf.trigger.event_types)} from "
                    f"{wf.trigger.source}); fix the event's workflow or event_type")
            return [wf]
        chosen = [wf for wf in map(self.latest, self.names()) if wf.accepts(event)]
        if not chosen:
            known = sorted({t for wf in self if wf.trigger.source == event.source
                            for t in wf.trigger.event_types})
            raise UnroutableEventError(
                f"no workflow starts on event type '{event.event_type}' from source "
                f"'{event.source}' (known there: {', '.join(known) or 'none'}); fix the "
                f"event_type or deploy a workflow that triggers on it")
        return chosen
