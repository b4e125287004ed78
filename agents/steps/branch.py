"""``branch``: the first case whose condition holds decides the output and the next step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from agents.expr import Expression
from agents.template import Template

from .base import StepContext, StepOutcome, StepSpec, register_step_kind

__all__ = ["BranchCase", "BranchDefault", "BranchStep"]


class BranchDefault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    next: str | None = None
    output: Any = None


class BranchCase(BranchDefault):
    when: str = Field(min_length=1, description="Condition in the expression language.")


@register_step_kind("branch")
class BranchStep(StepSpec):
    pure = True
    cases: list[BranchCase] = Field(min_length=1)
    default: BranchDefault = Field(default_factory=BranchDefault)
    _conditions: list[Expression] = PrivateAttr(default_factory=list)
    _outputs: list[Template | None] = PrivateAttr(default_factory=list)

    def compile(self, base_dir: Path) -> None:
        self._conditions = [self._expression(f"cases[{i}].when", case.when)
                            for i, case in enumerate(self.cases)]
        self._outputs = [
            None if c.output is None else self._template(f"{where}.output", c.output)
            for where, c in self._choices()]

    def _choices(self) -> list[tuple[str, BranchDefault]]:
        return [*((f"cases[{i}]", c) for i, c in enumerate(self.cases)),
                ("default", self.default)]

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        for i, condition in enumerate(self._conditions):
            yield f"cases[{i}].when", condition
        for (where, _), template in zip(self._choices(), self._outputs, strict=True):
            if template is not None:
                yield from self._template_expressions(f"{where}.output", template)

    def targets(self) -> Iterator[tuple[str, str]]:
        yield from super().targets()
        for where, choice in self._choices():
            if choice.next is not None:
                yield f"{where}.next", choice.next

    async def run(self, ctx: StepContext) -> StepOutcome:
        chosen = len(self.cases)  # the default
        for i, condition in enumerate(self._conditions):
            if condition.evaluate(ctx.scope):
                chosen = i
                break
        where, choice = self._choices()[chosen]
        template = self._outputs[chosen]
        output = {"case": where} if template is None else template.render(ctx.scope)
        return StepOutcome(output=output, next_step=choice.next or self.next)
