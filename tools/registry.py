"""The tool registry: named Python tools with validated arguments.

A tool is an ordinary function (sync or async) registered with a pydantic model of its
arguments. An async tool is awaited on the event loop; a sync one runs in a worker thread
(``asyncio.to_thread``), so a slow or blocking tool never stalls the other records in
flight. The full gateway (scopes, rate limits, circuit breaker, approvals) wraps
``ToolRegistry.call`` in a later issue; this module owns lookup and argument validation.
The time limit of a call is the engine's (``tool_timeout_s``), applied around ``call``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ValidationError

from agentfabric.errors import AgentFabricError, ConfigError, ToolError
from schemas.serde import validation_reason

__all__ = ["Tool", "ToolCall", "ToolRegistry"]

ToolFn = Callable[..., Any] | Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class ToolCall:
    """What a tool receives besides its arguments.

    ``agent`` is the calling step's identity (``workflow.step``) and ``token`` its signed,
    short-lived gateway token (``tools.gateway.identity``). ``degraded`` is filled by the gateway
    when a fallback answered instead of the tool (one line per fallback), so the step can
    record it on the run.
    """

    tool: str
    idempotency_key: str
    tenant: str
    run_id: str
    agent: str = ""
    token: str = ""
    workflow: str = ""
    step: str = ""
    degraded: list[str] = field(default_factory=list, compare=False)


@dataclass(frozen=True)
class Tool:
    name: str
    fn: ToolFn
    args_model: type[BaseModel]
    description: str
    wants_call: bool
    is_async: bool = False

    @cached_property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments (as offered to a model), built once."""
        return self.args_model.model_json_schema()


def _is_async(fn: ToolFn) -> bool:
    # a coroutine function, or an object whose class defines ``async def __call__``
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class ToolRegistry:
    """Tools by name. ``call`` validates arguments and translates unexpected failures."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, name: str, args: type[BaseModel], description: str = "",
                 ) -> Callable[[ToolFn], ToolFn]:
        def decorator(fn: ToolFn) -> ToolFn:
            if name in self._tools:
                raise ConfigError(f"tool '{name}' is registered twice")
            wants_call = "call" in inspect.signature(fn).parameters
            self._tools[name] = Tool(name, fn, args, description or (fn.__doc__ or "").strip(),
                                     wants_call, _is_async(fn))
            return fn
        return decorator

    def names(self) -> list[str]:
        return sorted(self._tools)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise ConfigError(f"no tool named '{name}' is registered (known: "
                              f"{', '.join(self.names()) or 'none'})") from None

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        tool = self.get(name)
        try:
            args = tool.args_model.model_validate(dict(arguments))
        except ValidationError as exc:
            raise ToolError(f"tool '{name}' rejected its arguments: {validation_reason(exc)}; "
                            f"fix the step's args") from exc
        kwargs: dict[str, Any] = {"call": call} if tool.wants_call else {}
        try:
            if tool.is_async:
                result = tool.fn(args, **kwargs)
            else:  # blocking code stays off the event loop
                result = await asyncio.to_thread(tool.fn, args, **kwargs)
            if inspect.isawaitable(result):  # a sync function that returned a coroutine
                result = await result
        except AgentFabricError:
            raise
        except Exception as exc:  # a tool's own bug: dead-letter with its type, never crash
            raise ToolError(f"tool '{name}' failed with {type(exc).__name__}: {exc}") from exc
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        return result
