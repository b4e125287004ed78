"""The model registry and the model client.

The registry (YAML, ``AGENTFABRIC_MODELS_FILE``, default ``agents/models.yaml``) names
providers (an OpenAI-compatible base URL and the environment variable that holds its key)
and models (provider, the provider's model id, price per million input and output tokens).
The client is the openai async client with its own retries (rate limits, server errors,
timeouts and lost connections, with jittered backoff that honours ``Retry-After``); what
still fails is classified by :func:`transient` into a TransientError (the step is retried
on the retry tiers) or a PermanentError (dead-lettered at once).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentfabric import tracing
from agentfabric.errors import ConfigError, PermanentError, TransientError
from schemas.models import Usage

if TYPE_CHECKING:  # the SDK takes ~0.4 s to import: only a process that calls a model does
    import openai

__all__ = ["ChatResult", "ModelClient", "ModelRegistry", "ModelSpec", "ProviderSpec",
           "RequestedToolCall", "load_registry", "transient"]

class ProviderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str = Field(pattern=r"^https?://")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    provider: str
    model: str
    input_usd_per_mtok: float = Field(default=0.0, ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0, le=20)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return round((input_tokens * self.input_usd_per_mtok
                      + output_tokens * self.output_usd_per_mtok) / 1_000_000, 10)


class ModelRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    providers: dict[str, ProviderSpec]
    models: dict[str, ModelSpec]

    def model_post_init(self, _context: Any) -> None:
        for name, spec in self.models.items():
            if spec.provider not in self.providers:
                raise ValueError(f"model '{name}' names provider '{spec.provider}', which is "
                                 f"not in providers ({', '.join(self.providers)})")

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"no model named '{name}' in the model registry (models: "
                              f"{', '.join(sorted(self.models))}); add it to the models "
                              f"file or fix the step") from None


def load_registry(path: Path | None = None) -> ModelRegistry:
    """Read the registry file (default: the shipped ``agents/models.yaml``)."""
    source = path or Path(str(resources.files("agents").joinpath("models.yaml")))
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: cannot read the model registry ({exc})") from exc
    try:
        return ModelRegistry.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: field '{where}': {err['msg']}") from exc


@dataclass(frozen=True)
class RequestedToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class ChatResult:
    content: str | None
    tool_calls: list[RequestedToolCall]
    usage: Usage
    message: dict[str, Any] = field(default_factory=dict)  # the assistant turn to append
    journaled: bool = False  # answered from the step's journal: made (and paid) before


def transient(exc: openai.OpenAIError) -> bool:
    """How a model error is classified once the openai SDK's own retries are spent: rate
    limits, timeouts, conflicts, server errors and lost connections are transient, as is
    anything the server marks ``x-should-retry: true``; other errors (bad request, auth,
    not found, unprocessable) are permanent. These are the SDK's own retry rules."""
    import openai
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        hint = exc.response.headers.get("x-should-retry")
        if hint in ("true", "false"):
            return hint == "true"
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


class ModelClient:
    """Chat completions through the openai async client, with retries and cost accounting."""

    def __init__(self, registry: ModelRegistry, *, timeout_s: float = 30.0,
                 max_retries: int = 4, env: Mapping[str, str] | None = None) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._env = os.environ if env is None else env
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def check(self, names: Sequence[str]) -> None:
        """Fail at start-up if a model is unknown or its provider's key is not set."""
        for name in names:
            spec = self.registry.get(name)
            provider = self.registry.providers[spec.provider]
            if provider.api_key_env and not self._env.get(provider.api_key_env):
                raise ConfigError(f"model '{name}' (provider '{spec.provider}') needs its API "
                                  f"key in ${provider.api_key_env}, which is not set")

    def openai_client(self, provider_name: str) -> openai.AsyncOpenAI:
        """The provider's openai client (shared, e.g. with an embedder)."""
        return self._client(provider_name)

    def _client(self, provider_name: str) -> openai.AsyncOpenAI:
        if provider_name not in self._clients:
            self._clients[provider_name] = self._new_client(provider_name)
        return self._clients[provider_name]

    def _new_client(self, provider_name: str) -> openai.AsyncOpenAI:
        import openai

        provider = self.registry.providers[provider_name]
        key = self._env.get(provider.api_key_env, "") if provider.api_key_env else ""
        # the SDK retries 408/409/429/5xx, timeouts and lost connections with jittered
        # backoff and honours Retry-After / retry-after-ms / x-should-retry: we use it as is
        # aiohttp as the transport (the SDK's own option): httpx's pool scans every
        # connection per request, which shows at the concurrency of a step's window
        return openai.AsyncOpenAI(base_url=provider.base_url, api_key=key or "unused",
                                  max_retries=self.max_retries, timeout=self.timeout_s,
                                  http_client=openai.DefaultAioHttpClient(
                                      timeout=self.timeout_s))

    async def _loop_client(self, provider_name: str) -> openai.AsyncOpenAI:
        """The provider's client; the first one is built in a thread, since building it
        loads the TLS certificates from disk (tens of milliseconds off the event loop)."""
        client = self._clients.get(provider_name)
        if client is None:
            built = await asyncio.to_thread(self._new_client, provider_name)
            client = self._clients.setdefault(provider_name, built)
            if client is not built:  # another call built one meanwhile: keep theirs
                await built.close()
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   tools: list[dict[str, Any]] | None = None,
                   response_format: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> ChatResult:
        spec = self.registry.get(model)
        client = await self._loop_client(spec.provider)
        import openai  # (loaded by then: the first client is built, off the loop)
        body: dict[str, Any] = {"model": spec.model, "messages": messages}
        if tools:
            body["tools"] = tools
        if response_format is not None:
            body["response_format"] = response_format
        options: dict[str, Any] = {"headers": dict(headers or {}),
                                   "timeout": spec.timeout_s or self.timeout_s}
        if spec.max_retries is not None:
            options["max_retries"] = spec.max_retries
        retries = self.max_retries if spec.max_retries is None else spec.max_retries
        # the span says which model and how many tokens, never the prompt or the answer
        with tracing.span(f"chat {spec.model}", {
                "gen_ai.operation.name": "chat", "gen_ai.system": spec.provider,
                "gen_ai.request.model": spec.model}, kind="client", model=model,
                tools_offered=len(tools or ())) as span:
            try:
                # the client's documented generic POST: its retries, timeouts and error
                # types, without building the SDK's typed request and response models per
                # call (they were a sixth of a worker's CPU in the llm benchmark; we read
                # four fields)
                raw = await client.post("/chat/completions", cast_to=bytes, body=body,
                                        options=cast(Any, options))
            except openai.OpenAIError as exc:
                if not transient(exc):
                    raise PermanentError(f"model '{model}' rejected the request "
                                         f"({_describe(exc)}); fix the step or the model "
                                         f"registry, then replay") from exc
                raise TransientError(
                    f"model '{model}' failed {retries + 1} times ({_describe(exc)}); the "
                    f"step will be retried later") from exc
            try:
                completion = json.loads(raw)
            except ValueError as exc:
                raise TransientError(f"model '{model}' answered with a body that is not "
                                     f"JSON; the step will be retried later") from exc
            result = _result(spec, completion)
            span.set({"gen_ai.usage.input_tokens": result.usage.input_tokens,
                      "gen_ai.usage.output_tokens": result.usage.output_tokens},
                     cost_usd=result.usage.cost_usd,
                     tool_calls_requested=len(result.tool_calls))
            span.outcome("tool_calls" if result.tool_calls else "ok")
        return result


def _describe(exc: openai.OpenAIError) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"
    return type(exc).__name__


def _result(spec: ModelSpec, completion: Any) -> ChatResult:
    """The parts of a chat completion (its JSON) a step uses."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise TransientError("the model returned no choices; the step will be retried")
    message = choices[0].get("message") or {}
    calls = [RequestedToolCall(str(c.get("id", "")), str(c["function"].get("name", "")),
                               c["function"].get("arguments") or "{}")
             for c in (message.get("tool_calls") or [])
             if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    usage = completion.get("usage") or {}
    input_tokens = int(usage.get("prompt_tokens") or 0)
    output_tokens = int(usage.get("completion_tokens") or 0)
    content = message.get("content")
    turn: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}}
                              for c in calls]
    return ChatResult(
        content=content, tool_calls=calls,
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                    cost_usd=spec.cost(input_tokens, output_tokens)),
        message=turn)


def tool_result_text(value: Any) -> str:
    """How a tool's result is fed back to the model: compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"),
                                                           default=str)
