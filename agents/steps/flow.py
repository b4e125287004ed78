"""Control-flow step kinds: ``loop``, ``parallel``, ``workflow`` (sub-workflow), ``approval``.

- ``loop`` runs its ``body`` (a chain of steps whose last one jumps back with ``next: <loop>``)
  until ``until`` holds, at most ``max_iterations`` times, then goes to its ``next``.
- ``parallel`` starts each of ``branches`` (a chain each, ending with ``next: <join>``) side
  by side; ``join`` runs once, when every branch has arrived, with all their outputs.
- ``workflow`` starts another workflow with ``input`` and continues with its result.
- ``approval`` parks the run on the approvals topic until a person decides (``agentfabric
  approvals``); approved runs go on, rejected ones go to ``on_reject`` (default: the run
  ends as rejected); a request nobody answers within ``expires_s`` ends the run as expired.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, field_validator

from agentfabric.errors import ExpressionEvalError, WorkflowError
from agents.expr import Expression
from agents.template import Template

from .base import (
    END,
    STEP_ID_PATTERN,
    FanOut,
    HandOffRequest,
    StepContext,
    StepOutcome,
    StepSpec,
    SubWorkflowCall,
    register_step_kind,
)

__all__ = ["ApprovalStep", "LoopStep", "ParallelStep", "WorkflowStep"]


@register_step_kind("loop")
class LoopStep(StepSpec):
    body: str = Field(pattern=STEP_ID_PATTERN, description="First step of the loop body.")
    until: str = Field(min_length=1, description="Stop when this holds (checked after a pass).")
    max_iterations: int = Field(default=10, ge=1, le=1000)
    _until: Expression = PrivateAttr()

    def compile(self, base_dir: Path) -> None:
        self._until = self._expression("until", self.until)

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        yield "until", self._until

    def targets(self) -> Iterator[tuple[str, str]]:
        yield from super().targets()
        yield "body", self.body

    def check_placement(self, step_ids: list[str]) -> None:
        index = step_ids.index(self.id)
        following = step_ids[index + 1] if index + 1 < len(step_ids) else END
        if self.next is None and following == self.body:
            raise WorkflowError("set next: the step to run when the loop ends (the step after "
                                "the loop is its body)", step=self.id, field="next")

    async def run(self, ctx: StepContext) -> StepOutcome:
        passes = ctx.message.path.count(self.id)
        if passes == 0:
            return StepOutcome({"iterations": 0, "done": False}, next_step=self.body)
        if self._until.evaluate(ctx.scope):
            return StepOutcome({"iterations": passes, "done": True})
        if passes >= self.max_iterations:
            return StepOutcome({"iterations": passes, "done": False})
        return StepOutcome({"iterations": passes, "done": False}, next_step=self.body)


@register_step_kind("parallel")
class ParallelStep(StepSpec):
    branches: list[str] = Field(min_length=2, description="First step of each branch.")
    join: str = Field(pattern=STEP_ID_PATTERN, description="Runs once all branches arrive.")

    @field_validator("branches")
    @classmethod
    def _distinct(cls, branches: list[str]) -> list[str]:
        if len(set(branches)) != len(branches):
            raise ValueError("each branch must start at a different step")
        return branches

    def targets(self) -> Iterator[tuple[str, str]]:
        yield from super().targets()
        for i, branch in enumerate(self.branches):
            yield f"branches[{i}]", branch
        yield "join", self.join

    async def run(self, ctx: StepContext) -> StepOutcome:
        return StepOutcome({"branches": list(self.branches)},
                           fan_out=FanOut(tuple(self.branches), self.join))


@register_step_kind("workflow")
class WorkflowStep(StepSpec):
    workflow: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    input: Any = Field(default="{{ input }}", description="The called workflow's input "
                                                          "(a template); default: this input.")
    _input: Template = PrivateAttr()

    def compile(self, base_dir: Path) -> None:
        self._input = self._template("input", self.input)

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        return self._template_expressions("input", self._input)

    def workflow_names(self) -> Iterator[str]:
        yield self.workflow

    async def run(self, ctx: StepContext) -> StepOutcome:
        payload = self._input.render(ctx.scope)
        if not isinstance(payload, dict):
            raise ExpressionEvalError(f"step '{self.id}' must give workflow '{self.workflow}' "
                                      f"an object as input, not {type(payload).__name__}")
        return StepOutcome({"workflow": self.workflow}, call=SubWorkflowCall(self.workflow,
                                                                             payload))


@register_step_kind("approval")
class ApprovalStep(StepSpec):
    reason: str = Field(min_length=1, description="Template: what the person decides.")
    approvers: list[str] = Field(default_factory=list, description="Who may decide (a hint).")
    on_reject: str = Field(default=END, description="Where a rejected run goes.")
    expires_s: float | None = Field(
        default=None, gt=0, le=90 * 86_400,
        description="Seconds a request may wait for a decision; then the run ends as "
                    "expired (default: the approval_expiry_s setting).")
    _reason: Template = PrivateAttr()

    def compile(self, base_dir: Path) -> None:
        self._reason = self._template("reason", self.reason)

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        return self._template_expressions("reason", self._reason)

    def targets(self) -> Iterator[tuple[str, str]]:
        yield from super().targets()
        yield "on_reject", self.on_reject

    async def run(self, ctx: StepContext) -> StepOutcome:
        reason = str(self._reason.render(ctx.scope))
        return StepOutcome({"reason": reason, "approvers": list(self.approvers)},
                           hand_off=HandOffRequest("approval", reason, self.expires_s))
