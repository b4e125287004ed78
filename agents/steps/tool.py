"""``tool``: call a registered tool with templated arguments; its result is the output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr

from agents.expr import Expression
from agents.template import Template
from schemas.models import Usage

from .base import StepContext, StepOutcome, StepSpec, register_step_kind

__all__ = ["ToolStep"]


@register_step_kind("tool")
class ToolStep(StepSpec):
    tool: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,127}$")
    args: dict[str, Any] = Field(default_factory=dict)
    _args: Template = PrivateAttr()

    def compile(self, base_dir: Path) -> None:
        self._args = self._template("args", self.args)

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        return self._template_expressions("args", self._args)

    def tool_names(self) -> Iterator[str]:
        yield self.tool

    async def run(self, ctx: StepContext) -> StepOutcome:
        call = ctx.tool_call(self.tool, ctx.message.idempotency_key)
        result = await ctx.tools.call(self.tool, self._args.render(ctx.scope), call)
        return StepOutcome(output=result, usage=Usage(tool_calls=1),
                           degraded=list(ctx.degraded))
