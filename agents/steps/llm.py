"""``llm``: ask a model, let it call tools through the registry, validate its structured output.

The loop: send the conversation; if the model asks for tools, call each through the tool
registry and feed the results back; stop when it answers. An answer that does not match
``output_schema`` is sent back with the validation error, at most ``max_output_retries``
times. A model still asking for tools after ``max_iterations`` calls is not looped further:
the run is handed to a person on the approvals topic. Tokens and cost are returned as usage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import Field, PrivateAttr, model_validator

from agentfabric.errors import PermanentError, ScopeError, ToolError, WorkflowError
from agents.expr import Expression
from agents.journal import request_digest
from agents.models import ChatResult, tool_result_text
from agents.recording import refuse
from agents.template import Template
from schemas.models import Usage
from tools.gateway.redact import sanitize_error
from tools.registry import ToolCall

from .base import HandOffRequest, StepContext, StepOutcome, StepSpec, register_step_kind

__all__ = ["LlmStep"]

HEADER_PREFIX = "x-agentfabric-"


def _read(base_dir: Path, relative: str, step: str, field: str) -> str:
    path = (base_dir / relative).resolve()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"cannot read {path} ({exc.strerror})", step=step,
                            field=field) from exc


@register_step_kind("llm")
class LlmStep(StepSpec):
    model: str = Field(min_length=1, description="A model name from the model registry.")
    system: str | None = Field(default=None, description="System prompt template (inline).")
    system_file: str | None = Field(default=None, description="...or a file beside the workflow.")
    prompt: Any = Field(default=None, description="User prompt template (inline): text, or a "
                                                  "mapping sent to the model as JSON.")
    prompt_file: str | None = Field(default=None, description="...or a file beside the "
                                                              "workflow (.yaml/.json files "
                                                              "are structured prompts).")
    tools: list[str] = Field(default_factory=list, description="Registered tools it may call.")
    output_schema: dict[str, Any] | None = None
    output_schema_file: str | None = None
    max_iterations: int = Field(default=10, ge=1, le=100)
    max_tool_calls_per_turn: int = Field(
        default=8, ge=1, le=128,
        description="Tool calls one model turn may make; further calls of that turn are "
                    "refused (the model is told why).")
    max_output_retries: int = Field(default=2, ge=0, le=10)
    _system: Template | None = PrivateAttr(default=None)
    _prompt: Template = PrivateAttr()
    _schema: dict[str, Any] | None = PrivateAttr(default=None)
    _validator: jsonschema.Draft202012Validator | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_source_each(self) -> LlmStep:
        for name in ("system", "prompt", "output_schema"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"give {name} or {name}_file, not both")
        if self.prompt is None and self.prompt_file is None:
            raise ValueError("give prompt or prompt_file")
        return self

    def compile(self, base_dir: Path) -> None:
        system = self.system
        if self.system_file is not None:
            system = _read(base_dir, self.system_file, self.id, "system_file")
        if system is not None:
            self._system = self._template("system_file" if self.system_file else "system",
                                          system)
        prompt = self.prompt
        if self.prompt_file is not None:
            prompt = _read(base_dir, self.prompt_file, self.id, "prompt_file")
            if Path(self.prompt_file).suffix in (".yaml", ".yml", ".json"):
                try:
                    prompt = yaml.safe_load(prompt)
                except yaml.YAMLError as exc:
                    raise WorkflowError(f"not YAML/JSON: {exc}", step=self.id,
                                        field="prompt_file") from exc
        self._prompt = self._template("prompt_file" if self.prompt_file else "prompt", prompt)
        schema = self.output_schema
        field = "output_schema"
        if self.output_schema_file is not None:
            field = "output_schema_file"
            try:
                schema = json.loads(_read(base_dir, self.output_schema_file, self.id, field))
            except json.JSONDecodeError as exc:
                raise WorkflowError(f"not JSON: {exc}", step=self.id, field=field) from exc
        if schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise WorkflowError(f"not a valid JSON schema: {exc.message}", step=self.id,
                                    field=field) from exc
            self._schema = schema
            self._validator = jsonschema.Draft202012Validator(schema)  # built once, not per reply

    def expressions(self) -> Iterator[tuple[str, Expression]]:
        if self._system is not None:
            yield from self._template_expressions("system", self._system)
        yield from self._template_expressions("prompt", self._prompt)

    def tool_names(self) -> Iterator[str]:
        yield from self.tools

    def model_names(self) -> Iterator[str]:
        yield self.model

    async def run(self, ctx: StepContext) -> StepOutcome:
        if ctx.models is None:
            raise PermanentError(f"step '{self.id}' needs a model client; configure models")
        msg = ctx.message
        messages: list[dict[str, Any]] = []
        if self._system is not None:
            messages.append({"role": "system", "content": _text(self._system.render(ctx.scope))})
        messages.append({"role": "user", "content": _text(self._prompt.render(ctx.scope))})
        tools = [_tool_definition(ctx, name) for name in self.tools]
        response_format = None if self._schema is None else {
            "type": "json_schema",
            "json_schema": {"name": self.id, "schema": self._schema, "strict": False}}
        headers = {f"{HEADER_PREFIX}workflow": msg.workflow, f"{HEADER_PREFIX}step": self.id,
                   f"{HEADER_PREFIX}run": msg.run_id}
        usage = Usage()
        seen: dict[str, int] = {}  # how often each (tool, arguments) was called
        output_failures = 0
        for _ in range(self.max_iterations):
            result = await ctx.models.chat(self.model, messages, tools=tools or None,
                                           response_format=response_format, headers=headers)
            usage += result.usage
            messages.append(result.message)
            if result.tool_calls:
                before = ctx.tool_calls
                for position, call in enumerate(result.tool_calls):
                    answer = (await self._call_tool(ctx, call, seen)
                              if position < self.max_tool_calls_per_turn else
                              await self._refuse(ctx, call, (
                                  f"at most {self.max_tool_calls_per_turn} tool calls per turn "
                                  f"(max_tool_calls_per_turn); ask for the rest in your next "
                                  f"turn")))
                    messages.append({"role": "tool", "tool_call_id": call.id,
                                     "content": answer})
                usage += Usage(tool_calls=ctx.tool_calls - before)
                continue
            problem, output = self._parse(result)
            if problem is None:
                return StepOutcome(output=output, usage=usage, degraded=list(ctx.degraded))
            output_failures += 1
            if output_failures > self.max_output_retries:
                raise PermanentError(
                    f"model '{self.model}' gave output that does not match the step's schema "
                    f"{output_failures} times ({problem}); improve the prompt or the schema")
            messages.append({"role": "user", "content":
                             f"Your reply is not valid: {problem}. Reply again with only JSON "
                             f"that matches the required schema."})
        return StepOutcome(
            output={"transcript": messages}, usage=usage,
            hand_off=HandOffRequest(
                "max_iterations", f"the model was still calling tools after "
                f"{self.max_iterations} iterations (max_iterations); a person should finish "
                f"step '{self.id}'"))

    async def _call_tool(self, ctx: StepContext, call: Any, seen: dict[str, int]) -> str:
        if call.name not in self.tools:
            return await self._refuse(ctx, call, (
                f"tool '{call.name}' is not one this step may call; you may call: "
                f"{', '.join(self.tools) or 'no tools'}"))
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as exc:
            return f"error: the arguments are not JSON ({exc}); send a JSON object"
        if not isinstance(arguments, dict):
            return "error: the arguments must be a JSON object"
        # stable across re-runs of the same call (the model's call ids and the call's
        # position in its turn are not): step visit + tool + arguments + repeat count
        what = request_digest(call.name, arguments)[:16]
        seen[what] = seen.get(what, 0) + 1
        identity = ctx.tool_call(call.name, f"{ctx.message.idempotency_key}:tool:{call.name}:"
                                            f"{what}:{seen[what]}")
        try:
            return tool_result_text(await ctx.tools.call(call.name, arguments, identity))
        except (ToolError, ScopeError) as exc:  # fed back: the model can correct its call
            return f"error: {sanitize_error(exc.reason)}"

    async def _refuse(self, ctx: StepContext, call: Any, reason: str) -> str:
        """A call the step will not make: audited as refused, and the model is told why."""
        identity = ToolCall(tool=call.name, idempotency_key=f"{ctx.message.idempotency_key}:"
                            f"refused:{call.name}", tenant=ctx.message.tenant,
                            run_id=ctx.message.run_id, agent=ctx.agent,
                            workflow=ctx.message.workflow, step=ctx.message.step)
        await refuse(ctx.tools, call.name, call.arguments or "", identity, reason)
        return f"error: refused: {reason}"

    def _parse(self, result: ChatResult) -> tuple[str | None, Any]:
        content = result.content or ""
        if self._validator is None:
            return None, content
        try:
            value = json.loads(content)
        except json.JSONDecodeError as exc:
            return f"it is not JSON ({exc.msg} at position {exc.pos})", None
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.path) or "the top level"
            return f"at {where}: {first.message}", None
        return None, value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _tool_definition(ctx: StepContext, name: str) -> dict[str, Any]:
    tool = ctx.tools.get(name)
    return {"type": "function", "function": {
        "name": name, "description": tool.description or name,
        "parameters": tool.parameters}}
