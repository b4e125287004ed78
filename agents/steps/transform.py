"""``transform``: render a templated mapping of the input and earlier outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from agents.expr import Expression
from agents.template import Template

from .base import StepContext, StepOutcome, StepSpec, register_step_kind

__all__ = ["TransformStep"]


@register_step_kind("transform")
class TransformStep(StepSpec):
    pure = True
    output: Any
    _output: Template = PrivateAttr()

    def compile(self, base_dir: Path) -> None:
        self._output = self._template("output", self.output)

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        return self._template_expressions("output", self._output)

    async def run(self, ctx: StepContext) -> StepOutcome:
        return StepOutcome(output=self._output.render(ctx.scope))
