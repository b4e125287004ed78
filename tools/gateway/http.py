"""HTTP tools: a declared request against a named service, over one shared aiohttp session.

A tool's :class:`~tools.gateway.spec.HttpBinding` says ``method`` and ``path`` on ``service``
(base URL from the ``service_urls`` setting) or on an absolute ``url``. ``{name}``
placeholders in the path are filled from the arguments (URL-quoted); the other arguments go
in the query string (GET, DELETE; ``None`` left out) or as the JSON body (POST, PUT, PATCH).
Every request carries ``Idempotency-Key`` (the call's key, the same on every attempt),
``X-Tenant`` and ``X-Agent``.

Answers: 2xx is the result (JSON, or text; 204 is ``None``). Connection errors, 408, 429 and
5xx are :class:`ServiceUnavailableError` (transient, with the ``Retry-After`` of a 429/503
for the retry stage); other 4xx are a :class:`~agentfabric.errors.ToolError` carrying the
service's own error text, sanitized and bounded. The time limit is the gateway's timeout
stage, around each attempt.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from agentfabric import tracing
from agentfabric.errors import ConfigError, ToolError, TransientError
from tools.registry import ToolCall

from .redact import sanitize_error
from .spec import HttpBinding, ToolSpec

__all__ = ["HttpTools", "ServiceUnavailableError", "parse_retry_after"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_QUERY_METHODS = {"GET", "DELETE"}
_TRANSIENT_STATUS = {408, 425, 429}
_MAX_BODY_CHARS = 2_000
_ERROR_FIELDS = ("error", "detail", "message", "title", "reason")


class ServiceUnavailableError(TransientError):
    """The service did not answer, or answered 408/429/5xx: try again (after
    ``retry_after_s`` when the service said how long to wait)."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def placeholders(path: str) -> list[str]:
    """The ``{name}`` placeholders of a path, in order."""
    return _PLACEHOLDER.findall(path)


class HttpTools:
    """Runs HTTP tools. One :class:`aiohttp.ClientSession` for the gateway's lifetime,
    opened on first use; :meth:`close` closes it."""

    def __init__(self, service_urls: Mapping[str, str], *, user_agent: str = "agentfabric",
                 connections: int = 100) -> None:
        self._urls = {name: url.rstrip("/") for name, url in service_urls.items()}
        self._user_agent = user_agent
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    def check(self, spec: ToolSpec) -> None:
        """ConfigError if ``spec``'s service has no URL or a placeholder is no argument."""
        binding = spec.http
        if binding is None:
            return
        if binding.service is not None and binding.service not in self._urls:
            raise ConfigError(f"tool '{spec.name}' ({spec.source}) calls service "
                              f"'{binding.service}', which has no URL; add it to the "
                              f"service_urls setting (known: {', '.join(sorted(self._urls))})")
        properties = spec.parameters.get("properties", {})
        for name in placeholders(binding.path):
            if name not in properties:
                raise ConfigError(f"tool '{spec.name}' ({spec.source}): path placeholder "
                                  f"{{{name}}} is not one of its parameters")

    def base_url(self, binding: HttpBinding) -> str:
        if binding.url is not None:
            return binding.url.rstrip("/")
        assert binding.service is not None  # one of them, checked by HttpBinding
        try:
            return self._urls[binding.service]
        except KeyError:
            raise ConfigError(f"service '{binding.service}' has no URL; add it to the "
                              f"service_urls setting") from None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections),
                headers={"User-Agent": self._user_agent},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, spec: ToolSpec, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        binding = spec.http
        if binding is None:
            raise ConfigError(f"tool '{spec.name}' is not an http tool")
        path, rest = _fill(binding.path, arguments)
        url = self.base_url(binding) + path
        headers = {**binding.headers, "Idempotency-Key": call.idempotency_key,
                   "X-Tenant": call.tenant, "X-Agent": call.agent or "anonymous",
                   "Accept": "application/json"}
        if call.run_id:
            headers["X-Run-Id"] = call.run_id
        traceparent = tracing.current_traceparent()  # None unless spans are exported
        if traceparent is not None:
            headers["traceparent"] = traceparent
        params: dict[str, str] | None = None
        body: dict[str, Any] | None = None
        if binding.method in _QUERY_METHODS:
            params = {k: _query_value(v) for k, v in rest.items() if v is not None}
        else:
            body = rest
        where = f"{binding.method} {binding.service or binding.url}{binding.path}"
        try:
            async with self.session().request(binding.method, url, params=params, json=body,
                                              headers=headers) as response:
                text = await response.text(errors="replace")
                return _answer(spec.name, where, response, text)
        except aiohttp.ClientError as exc:
            raise ServiceUnavailableError(
                f"tool '{spec.name}': {where} failed ({type(exc).__name__}: "
                f"{sanitize_error(str(exc), 200)}); the service may be down") from exc
        except TimeoutError as exc:  # aiohttp's own socket timeouts
            raise ServiceUnavailableError(f"tool '{spec.name}': {where} timed out "
                                          f"connecting") from exc


def _fill(path: str, arguments: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    rest = dict(arguments)

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if rest.get(name) is None:
            raise ToolError(f"the path parameter '{name}' is missing from the arguments")
        return quote(_query_value(rest.pop(name)), safe="")

    return _PLACEHOLDER.sub(value, path), rest


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _answer(tool: str, where: str, response: aiohttp.ClientResponse, text: str) -> Any:
    status = response.status
    if 200 <= status < 300:
        if status == 204 or not text:
            return None
        if "json" in (response.content_type or ""):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ToolError(f"tool '{tool}': {where} answered {status} with invalid JSON "
                                f"({exc.msg}); the service is broken") from exc
        return text
    detail = _error_text(text)
    if status >= 500 or status in _TRANSIENT_STATUS:
        wait = parse_retry_after(response.headers.get("Retry-After")) \
            if status in (429, 503) else None
        raise ServiceUnavailableError(
            f"tool '{tool}': {where} answered {status}" + (f": {detail}" if detail else ""),
            status=status, retry_after_s=wait)
    raise ToolError(f"tool '{tool}': {where} refused the call ({status})"
                    + (f": {detail}" if detail else ""))


def _error_text(text: str) -> str:
    """The service's own error message: a JSON error field if there is one, else the text."""
    text = text[:_MAX_BODY_CHARS]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return sanitize_error(text, 300)
    if isinstance(data, dict):
        for key in _ERROR_FIELDS:
            value = data.get(key)
            if isinstance(value, str) and value:
                return sanitize_error(value, 300)
            if isinstance(value, dict | list) and value:
                return sanitize_error(json.dumps(value, separators=(",", ":")), 300)
    return sanitize_error(json.dumps(data, separators=(",", ":")), 300)
