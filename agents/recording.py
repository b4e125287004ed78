"""Record and replay a run's interactions with models and tools.

While a step runs, every model response and tool result passes through an
:class:`InteractionLog`. A recorded run keeps them (``StepRecording`` on the recordings
topic); a replay runs the same steps against a :class:`Replay` that answers every model
and tool call from the recording, in order, and fails with :class:`ReplayDivergence` when
the run asks for something the recording does not have. Same inputs and same answers give
byte-identical step outputs: determinism at the workflow level, whatever the model does.

Every live tool call passes through :meth:`InteractionLog.call`, which bounds it by the
step's tool timeout: a tool step's call and the calls a model asks for alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentfabric.errors import PermanentError, TransientError
from schemas.models import Usage, canonical_json
from tools.knowledge import KnowledgeBase
from tools.registry import Tool, ToolCall, ToolRegistry
from tools.vectors import Condition, Hit

from .models import ChatResult, ModelClient, RequestedToolCall

__all__ = [
    "ChatModel",
    "InteractionLog",
    "KnowledgeSearch",
    "Replay",
    "ReplayDivergence",
    "ToolCaller",
    "output_bytes",
]


class ReplayDivergence(PermanentError):
    """The replayed run asked for a call the recording does not hold."""


class ChatModel(Protocol):
    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   tools: list[dict[str, Any]] | None = None,
                   response_format: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> ChatResult: ...


class KnowledgeSearch(Protocol):
    async def search(self, collection: str, tenant: str, query: str, *, k: int = 5,
                     alpha: float = 1.0, filters: Sequence[Condition] = ()) -> list[Hit]: ...


class ToolCaller(Protocol):
    def get(self, name: str) -> Tool: ...

    def names(self) -> list[str]: ...

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any: ...


def output_bytes(output: Any) -> str:
    """The canonical text of a step output: what 'byte-identical' compares."""
    return canonical_json(output)


def _chat_record(model: str, result: ChatResult) -> dict[str, Any]:
    return {"kind": "model", "name": model, "content": result.content,
            "tool_calls": [[c.id, c.name, c.arguments] for c in result.tool_calls],
            "usage": result.usage.model_dump(), "message": result.message}


def _chat_result(entry: dict[str, Any]) -> ChatResult:
    return ChatResult(content=entry["content"],
                      tool_calls=[RequestedToolCall(*c) for c in entry["tool_calls"]],
                      usage=Usage.model_validate(entry["usage"]), message=entry["message"])


@dataclass
class InteractionLog:
    """Wraps the live model client, tool registry and knowledge base, writing down every
    answer. A tool call longer than ``tool_timeout_s`` fails as a TransientError (a sync
    tool's thread cannot be stopped: it runs on, but its answer is dropped)."""

    models: ModelClient | None
    tools: ToolRegistry
    knowledge: KnowledgeBase | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    tool_timeout_s: float = 30.0
    step: str = ""

    async def search(self, collection: str, tenant: str, query: str, *, k: int = 5,
                     alpha: float = 1.0, filters: Sequence[Condition] = ()) -> list[Hit]:
        if self.knowledge is None:
            raise PermanentError("this step looks things up, but no knowledge base is "
                                 "configured")
        hits = await self.knowledge.search(collection, tenant, query, k=k, alpha=alpha,
                                           filters=filters)
        self.entries.append({"kind": "lookup", "name": collection, "query": query,
                             "hits": [h.model_dump() for h in hits]})
        return hits

    def get(self, name: str) -> Tool:
        return self.tools.get(name)

    def names(self) -> list[str]:
        return self.tools.names()

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   tools: list[dict[str, Any]] | None = None,
                   response_format: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> ChatResult:
        if self.models is None:
            raise PermanentError("this step calls a model, but no model client is configured")
        result = await self.models.chat(model, messages, tools=tools,
                                        response_format=response_format, headers=headers)
        self.entries.append(_chat_record(model, result))
        return result

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        try:
            async with asyncio.timeout(self.tool_timeout_s) as limit:
                result = await self.tools.call(name, arguments, call)
        except TimeoutError as exc:
            if not limit.expired():
                raise  # not our limit (the registry wraps a tool's own errors anyway)
            by = f" (step '{self.step}')" if self.step else ""
            raise TransientError(
                f"tool '{name}'{by} did not answer within {self.tool_timeout_s:g} s, so the "
                f"step will be retried; raise the step's tool_timeout_s if the tool is "
                f"slow, or check the tool") from exc
        self.entries.append({"kind": "tool", "name": name,
                             "arguments": json.loads(canonical_json(dict(arguments))),
                             "result": result})
        return result


@dataclass
class Replay:
    """Answers model and tool calls from a recording, in order, checking each request."""

    tools: ToolRegistry
    entries: list[dict[str, Any]]
    step: str
    position: int = 0

    def get(self, name: str) -> Tool:
        return self.tools.get(name)

    def names(self) -> list[str]:
        return self.tools.names()

    def _next(self, kind: str, what: str) -> dict[str, Any]:
        if self.position >= len(self.entries):
            raise ReplayDivergence(f"step '{self.step}' made call {self.position + 1} ({what}), "
                                   f"but the recording has only {len(self.entries)}")
        entry = self.entries[self.position]
        # the model's name may change in the registry; a tool or a collection may not
        if entry["kind"] != kind or (kind != "model" and entry["name"] != what):
            raise ReplayDivergence(f"step '{self.step}' call {self.position + 1}: the replay asked "
                                   f"for {kind} {what}, the recording has {entry['kind']} "
                                   f"{entry['name']}")
        self.position += 1
        return entry

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   tools: list[dict[str, Any]] | None = None,
                   response_format: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> ChatResult:
        return _chat_result(self._next("model", model))

    async def search(self, collection: str, tenant: str, query: str, *, k: int = 5,
                     alpha: float = 1.0, filters: Sequence[Condition] = ()) -> list[Hit]:
        entry = self._next("lookup", collection)
        if entry["query"] != query:
            raise ReplayDivergence(f"step '{self.step}' looked up other text than recorded")
        return [Hit.model_validate(h) for h in entry["hits"]]

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        entry = self._next("tool", name)
        if canonical_json(dict(arguments)) != canonical_json(entry["arguments"]):
            raise ReplayDivergence(f"step '{self.step}' called tool {name} with other arguments "
                                   f"than recorded")
        return entry["result"]

    def finished(self) -> None:
        if self.position != len(self.entries):
            raise ReplayDivergence(f"step '{self.step}' made {self.position} calls; the "
                                   f"recording has {len(self.entries)}")
