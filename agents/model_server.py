"""A local OpenAI-compatible HTTP server for tests and the offline demo, driven by a script.

The real ``openai.AsyncOpenAI`` client talks to it with ``base_url=handle.url``. Endpoints:
``POST /v1/chat/completions`` (no streaming), ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /healthz``, ``GET /metrics`` (Prometheus: requests by endpoint, model and status,
latency, tokens), and for tests ``POST /_script`` (replace the script: YAML or JSON body),
``POST /_script/reset`` (forget how many requests each rule's faults have served),
``GET /_requests`` (the request log) and ``DELETE /_requests`` (clear it).

Chat requests pick the first rule of the :class:`ModelScript` whose ``match`` fits: the
``x-agentfabric-workflow`` and ``x-agentfabric-step`` headers, the request's ``model``, and a
substring of the user messages. The turn index is the number of assistant messages in the
request. Templates see ``user`` (the last user message's text), ``user_json`` (that text parsed
as JSON, else null), ``tool_results`` (each tool message's content, parsed as JSON if it
parses), ``turn``, ``model`` and ``headers`` (the ``x-agentfabric-*`` headers, lower-cased,
without the prefix). Tool call ids are ``call_{turn}_{i}``.

Token counts are deterministic: a token is a match of ``\\w+|[^\\w\\s]``. Prompt tokens are
the tokens of every message's content, its tool calls' names and argument texts, and the
tools' JSON, plus 3 per message; completion tokens are those of the answer's content and its
tool calls' names and argument texts.

Embeddings hash the text's lower-cased ``\\w+`` tokens into ``embedding_dim`` buckets (sign and
bucket from blake2b, so stable across processes) and L2-normalise; a text without tokens gives
the unit vector on the first axis.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import math
import re
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agentfabric.errors import ConfigError, ExpressionEvalError, PortInUseError
from agents.model_script import FaultSpec, ModelScript, RuleSpec, TurnSpec

__all__ = ["ModelScript", "ModelServerHandle", "count_tokens", "create_app", "serve"]

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")
_HEADER_PREFIX = "x-agentfabric-"
_PER_MESSAGE = 3


def count_tokens(text: str) -> int:
    """Tokens in ``text``: each run of word characters and each other non-space character."""
    return sum(1 for _ in _TOKEN.finditer(text))


def _embed(text: str, dim: int) -> list[float]:
    vector = [0.0] * dim
    for token in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "big") % dim
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:
        return [1.0] + [0.0] * (dim - 1)
    return [x / norm for x in vector]


class _ApiError(Exception):
    """Answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers or {}


def _error_response(exc: _ApiError) -> web.Response:
    body = {"error": {"message": exc.message, "type": exc.type, "code": exc.code, "param": None}}
    return web.json_response(body, status=exc.status, headers=exc.headers)


def _text(content: Any) -> str:
    """A message content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)
                       and isinstance(p.get("text"), str))
    return ""


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _prompt_tokens(messages: list[dict[str, Any]], tools: Any) -> int:
    total = _PER_MESSAGE * len(messages)
    for message in messages:
        total += count_tokens(_text(message.get("content")))
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                total += count_tokens(str(function.get("name", "")))
                total += count_tokens(str(function.get("arguments", "")))
    if tools:
        total += count_tokens(_dumps(tools))
    return total


@dataclass
class _State:
    script: ModelScript
    served: dict[int, int] = field(default_factory=dict)  # rule index -> requests seen
    log: list[dict[str, Any]] = field(default_factory=list)
    metrics: _Metrics = field(default_factory=lambda: _Metrics())

    def observe(self, request: web.Request, status: int, seconds: float) -> None:
        self.metrics.observe(request, status, seconds, set(self.script.model_names()))

    def rule_label(self, index: int) -> str:
        return self.script.rules[index].name or f"rules[{index}]"


_STATE = web.AppKey("agentfabric_model_state", _State)
_ENTRY = web.RequestKey("agentfabric_log_entry", dict)  # the request's log entry


class _Metrics:
    """The server's own registry (nothing global): what ``GET /metrics`` serves."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("agentfabric_model_server_requests",
                                "Requests answered, by endpoint, model and HTTP status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.seconds = Histogram("agentfabric_model_server_request_seconds",
                                 "Time to answer a request, scripted latency included",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("agentfabric_model_server_tokens",
                              "Tokens counted in requests (in) and answers (out)",
                              ["model", "direction"], registry=self.registry)

    def observe(self, request: web.Request, status: int, seconds: float,
                known: set[str]) -> None:
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        entry = request.get(_ENTRY)
        model = str(entry.get("model") or "-") if entry else "-"
        if model != "-" and model not in known:  # the label values stay the script's
            model = "other"
        self.requests.labels(endpoint, model, str(status)).inc()
        self.seconds.labels(endpoint).observe(seconds)
        if entry:
            self.tokens.labels(model, "in").inc(int(entry.get("prompt_tokens") or 0))
            self.tokens.labels(model, "out").inc(int(entry.get("completion_tokens") or 0))


def _matches(rule: RuleSpec, workflow: str | None, step: str | None, model: str,
             user_text: str) -> bool:
    m = rule.match
    return ((m.workflow is None or m.workflow == workflow)
            and (m.step is None or m.step == step)
            and (m.model is None or m.model == model)
            and (m.user_contains is None or m.user_contains in user_text))


def _render_turn(turn: TurnSpec, scope: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if turn.template is not None:
        content = turn.template.render(scope)
        message["content"] = content if isinstance(content, str) else _dumps(content)
    if turn.tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{scope['turn']}_{i}", "type": "function",
             "function": {"name": call.name, "arguments": _dumps(call.template.render(scope))}}
            for i, call in enumerate(turn.tool_calls)
        ]
    return message


def _completion_tokens(message: dict[str, Any]) -> int:
    total = count_tokens(message["content"] or "")
    for call in message.get("tool_calls", []):
        function = call["function"]
        total += count_tokens(function["name"]) + count_tokens(function["arguments"])
    return total


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _ApiError(400, f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object")
    return body


async def _chat(request: web.Request) -> web.Response:
    received_at = time.monotonic()
    state = request.app[_STATE]
    body = await _json_body(request)
    if body.get("stream"):
        raise _ApiError(400, "streaming is not supported by the agentfabric model server",
                        code="unsupported_parameter")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "'model' is required and must be a string")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise _ApiError(400, "'messages' must be a non-empty list of objects with a 'role'")
    headers = {k.lower().removeprefix(_HEADER_PREFIX): v for k, v in request.headers.items()
               if k.lower().startswith(_HEADER_PREFIX)}
    workflow, step = headers.get("workflow"), headers.get("step")
    users = [_text(m.get("content")) for m in messages if m["role"] == "user"]
    turn = sum(1 for m in messages if m["role"] == "assistant")
    entry: dict[str, Any] = {
        "rule": None, "workflow": workflow, "step": step, "model": model, "status": 200,
        "turn": turn, "prompt_tokens": _prompt_tokens(messages, body.get("tools")),
        "completion_tokens": 0, "fault": None, "received_at": received_at,
    }
    state.log.append(entry)
    request[_ENTRY] = entry
    try:
        index = next((i for i, rule in enumerate(state.script.rules)
                      if _matches(rule, workflow, step, model, "\n".join(users))), None)
        if index is None:
            raise _ApiError(400, f"no script rule matches workflow={workflow}, step={step}, "
                                 f"model={model}", code="no_matching_rule")
        rule, label = state.script.rules[index], state.rule_label(index)
        entry["rule"] = label
        number = state.served.get(index, 0)
        state.served[index] = number + 1
        fault = rule.fault_for(number)
        delay_ms = rule.latency_ms + (fault.delay_ms if fault else 0)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if fault is not None and fault.status is not None:
            entry["fault"] = f"status {fault.status}"
            raise _fault_error(fault, label, number)
        if fault is not None:
            entry["fault"] = f"delay {fault.delay_ms} ms"
        if turn < len(rule.turns):
            spec = rule.turns[turn]
        elif rule.repeat_last:
            spec = rule.turns[-1]
        else:
            raise _ApiError(400, f"script exhausted: rule '{label}' has {len(rule.turns)} "
                                 f"turns, the request is at turn {turn}", code="script_exhausted")
        last_user = users[-1] if users else ""
        scope = {
            "user": last_user,
            "user_json": _json_or_none(last_user),
            "tool_results": [_json_or_text(_text(m.get("content")))
                             for m in messages if m["role"] == "tool"],
            "turn": turn, "model": model, "headers": headers,
        }
        try:
            message = _render_turn(spec, scope)
        except ExpressionEvalError as exc:
            raise _ApiError(400, f"rule '{label}' turn {turn} does not render: {exc}",
                            code="script_render_error") from None
    except _ApiError as exc:
        entry["status"] = exc.status
        raise
    entry["completion_tokens"] = completion = _completion_tokens(message)
    prompt = entry["prompt_tokens"]
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if "tool_calls" in message else "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    })


def _fault_error(fault: FaultSpec, label: str, number: int) -> _ApiError:
    status = fault.status or 500
    message = fault.message or f"scripted fault: status {status} (rule '{label}', " \
                               f"request {number + 1})"
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        seconds = fault.retry_after
        headers["Retry-After"] = str(int(seconds)) if seconds.is_integer() else repr(seconds)
    if status == 429:
        return _ApiError(status, message, type_="requests", code="rate_limit_exceeded",
                         headers=headers)
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return _ApiError(status, message, type_=type_, code="scripted_fault", headers=headers)


async def _embeddings(request: web.Request) -> web.Response:
    received_at = time.monotonic()
    state = request.app[_STATE]
    body = await _json_body(request)
    raw, model = body.get("input"), body.get("model") or state.script.default_model
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _ApiError(400, "'input' must be a string or a non-empty list of strings "
                             "(token arrays are not supported)")
    dim = body.get("dimensions") or state.script.embedding_dim
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 65536:
        raise _ApiError(400, "'dimensions' must be an integer from 1 to 65536")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _ApiError(400, "'encoding_format' must be 'float' or 'base64'")
    data: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        vector = _embed(text, dim)
        encoded: Any = vector
        if encoding == "base64":
            encoded = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(count_tokens(t) for t in texts)
    request[_ENTRY] = {"model": model, "prompt_tokens": tokens}
    state.log.append({"rule": None, "workflow": request.headers.get("x-agentfabric-workflow"),
                      "step": request.headers.get("x-agentfabric-step"), "model": model,
                      "status": 200, "turn": None, "prompt_tokens": tokens,
                      "completion_tokens": 0, "fault": None, "received_at": received_at,
                      "endpoint": "embeddings"})
    return web.json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _models(request: web.Request) -> web.Response:
    names = request.app[_STATE].script.model_names()
    return web.json_response({"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "agentfabric"} for n in names]})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _replace_script(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        script = ModelScript.loads(await request.text(), source="POST /_script")
    except ConfigError as exc:
        raise _ApiError(400, str(exc), code="invalid_script") from None
    state.script, state.served = script, {}
    return web.json_response({"ok": True, "rules": len(script.rules)})


async def _reset(request: web.Request) -> web.Response:
    request.app[_STATE].served = {}
    return web.json_response({"ok": True})


async def _requests(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].log)


async def _clear_requests(request: web.Request) -> web.Response:
    request.app[_STATE].log.clear()
    return web.json_response({"ok": True})


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    body = generate_latest(request.app[_STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _observed(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Count and time every API request (not the metrics or test endpoints)."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    started, status = time.perf_counter(), 500
    try:
        response = await handler(request)  # API errors are answers already (_errors)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away (e.g. during a scripted latency)
        raise
    finally:
        request.app[_STATE].observe(request, status, time.perf_counter() - started)


@web.middleware
async def _errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(_ApiError(exc.status, f"{exc.reason}: {request.method} "
                                                     f"{request.path}", code=str(exc.status)))


def create_app(script: ModelScript) -> web.Application:
    """The aiohttp application serving ``script``; state lives in the application."""
    app = web.Application(middlewares=[_observed, _errors])
    app[_STATE] = _State(script)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/_script", _replace_script)
    app.router.add_post("/_script/reset", _reset)
    app.router.add_get("/_requests", _requests)
    app.router.add_delete("/_requests", _clear_requests)
    return app


@dataclass
class ModelServerHandle:
    """A running server: ``url`` is the OpenAI ``base_url`` (ending in /v1)."""

    host: str
    port: int
    app: web.Application
    _runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> ModelServerHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve(script: ModelScript, host: str = "127.0.0.1",
                port: int = 18080) -> ModelServerHandle:
    """Start serving ``script`` on ``host:port`` (port 0 picks a free one)."""
    app = create_app(script)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"the model server cannot bind {host}:{port}: the port is "
                                 "taken; pick another port or 0 for a free one") from exc
        raise
    actual = next(addr[1] for addr in runner.addresses if isinstance(addr, tuple))
    return ModelServerHandle(host, int(actual), app, runner)
