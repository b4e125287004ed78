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
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentfabric.errors import PermanentError, ToolError, TransientError
from schemas.models import Usage, canonical_json
from tools.knowledge import KnowledgeBase
from tools.registry import ToolCall
from tools.vectors import Condition, Hit

from .journal import Journal, request_digest
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


log = logging.getLogger(__name__)

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


class ToolView(Protocol):
    """What a model is shown of a tool."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> dict[str, Any]: ...


class ToolCaller(Protocol):
    def get(self, name: str) -> ToolView: ...

    def names(self) -> list[str]: ...

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any: ...


async def refuse(tools: object, name: str, arguments: Any, call: ToolCall, reason: str,
                 ) -> None:
    """Tell the gateway (if ``tools`` is one) about a call a step refused, for its audit."""
    hook = getattr(tools, "refuse", None)
    if hook is not None:
        await hook(name, arguments, call, reason)


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
    tools: ToolCaller
    knowledge: KnowledgeBase | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    tool_timeout_s: float = 30.0
    step: str = ""
    journal: Journal | None = None
    journal_key: str = ""
    _journaled: list[dict[str, Any]] | None = field(default=None, repr=False)

    def _digest(self, *parts: Any) -> str | None:
        """What a call asked for, to check a journaled answer fits; only when journaling
        (it hashes the whole conversation of a model call)."""
        return request_digest(*parts) if self.journal is not None else None

    async def _resume(self, kind: str, name: str, request: str | None,
                      ) -> dict[str, Any] | None:
        """The journaled answer to this call, if the step made it before it ran again."""
        if self.journal is None:
            return None
        if self._journaled is None:
            self._journaled = await self.journal.load(self.journal_key)
        position = len(self.entries)
        if position >= len(self._journaled):
            return None
        entry = self._journaled[position]
        if (entry.get("kind"), entry.get("name"), entry.get("request")) == (kind, name,
                                                                             request):
            self.entries.append(entry)
            return entry
        log.warning("step '%s' asked for other calls than its journal holds from call %d on "
                    "(%s %s); running them live", self.step, position + 1, kind, name)
        del self._journaled[position:]
        await self.journal.truncate(self.journal_key, position)
        return None

    async def _done(self, entry: dict[str, Any]) -> None:
        if entry.get("request") is None:
            entry.pop("request", None)
        self.entries.append(entry)
        if self.journal is not None:
            if self._journaled is not None:
                self._journaled.append(entry)
            await self.journal.append(self.journal_key, entry)

    async def search(self, collection: str, tenant: str, query: str, *, k: int = 5,
                     alpha: float = 1.0, filters: Sequence[Condition] = ()) -> list[Hit]:
        request = self._digest(collection, tenant, query, k, alpha,
                                 [repr(f) for f in filters])
        if (entry := await self._resume("lookup", collection, request)) is not None:
            return [Hit.model_validate(h) for h in entry["hits"]]
        if self.knowledge is None:
            raise PermanentError("this step looks things up, but no knowledge base is "
                                 "configured")
        hits = await self.knowledge.search(collection, tenant, query, k=k, alpha=alpha,
                                           filters=filters)
        await self._done({"kind": "lookup", "name": collection, "query": query,
                          "request": request, "hits": [h.model_dump() for h in hits]})
        return hits

    def get(self, name: str) -> ToolView:
        return self.tools.get(name)

    def names(self) -> list[str]:
        return self.tools.names()

    async def refuse(self, name: str, arguments: Any, call: ToolCall, reason: str) -> None:
        await refuse(self.tools, name, arguments, call, reason)

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   tools: list[dict[str, Any]] | None = None,
                   response_format: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> ChatResult:
        request = self._digest(model, messages, tools, response_format)
        if (entry := await self._resume("model", model, request)) is not None:
            return dataclasses.replace(_chat_result(entry), journaled=True)
        if self.models is None:
            raise PermanentError("this step calls a model, but no model client is configured")
        result = await self.models.chat(model, messages, tools=tools,
                                        response_format=response_format, headers=headers)
        await self._done({**_chat_record(model, result), "request": request})
        return result

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        args = json.loads(canonical_json(dict(arguments)))
        request = self._digest(name, args, call.idempotency_key)
        if (entry := await self._resume("tool", name, request)) is not None:
            call.degraded.extend(entry.get("degraded", ()))
            return _tool_answer(entry)
        # the gateway applies each tool's own timeout per attempt (and retries); this bound
        # is for plain registries
        bound = None if getattr(self.tools, "owns_timeouts", False) else self.tool_timeout_s
        noted = len(call.degraded)
        try:
            async with asyncio.timeout(bound) as limit:
                result = await self.tools.call(name, arguments, call)
        except TimeoutError as exc:
            if not limit.expired():
                raise  # not our limit (the registry wraps a tool's own errors anyway)
            by = f" (step '{self.step}')" if self.step else ""
            raise TransientError(
                f"tool '{name}'{by} did not answer within {self.tool_timeout_s:g} s, so the "
                f"step will be retried; raise the step's tool_timeout_s if the tool is "
                f"slow, or check the tool") from exc
        except ToolError as exc:  # a refusal is an answer too: journaled and recorded
            await self._done({"kind": "tool", "name": name, "arguments": args,
                              "request": request, "error": exc.reason})
            raise
        # what the run keeps is plain JSON (dates, decimals, ids as text), as the model sees it
        result = json.loads(json.dumps(result, default=str))
        entry = {"kind": "tool", "name": name, "arguments": args, "request": request,
                 "result": result}
        if len(call.degraded) > noted:  # a fallback answered: the run records it
            entry["degraded"] = call.degraded[noted:]
        await self._done(entry)
        return result


def _tool_answer(entry: dict[str, Any]) -> Any:
    if "error" in entry:
        raise ToolError(entry["error"])
    return entry["result"]


@dataclass
class Replay:
    """Answers model and tool calls from a recording, in order, checking each request."""

    tools: ToolCaller
    entries: list[dict[str, Any]]
    step: str
    position: int = 0

    def get(self, name: str) -> ToolView:
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
        call.degraded.extend(entry.get("degraded", ()))
        return _tool_answer(entry)

    def finished(self) -> None:
        if self.position != len(self.entries):
            raise ReplayDivergence(f"step '{self.step}' made {self.position} calls; the "
                                   f"recording has {len(self.entries)}")
