"""HTTP tools against a local aiohttp server: path parameters, query or JSON body, the
gateway's headers, and the status mapping (transient: connection errors, 408/429/5xx with
Retry-After; permanent: other 4xx with the service's sanitized error text)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agentfabric.errors import ConfigError, ToolError
from streams.embedded import free_port
from tools.gateway.http import HttpTools, ServiceUnavailableError, parse_retry_after
from tools.gateway.spec import ToolSpec
from tools.registry import ToolCall

CALL = ToolCall(tool="t", idempotency_key="run-1:step:3", tenant="acme", run_id="run-1",
                agent="wf.step")


@dataclass
class Seen:
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[web.Response] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handle(request: web.Request) -> web.Response:
        body = await request.text()
        seen.requests.append({"method": request.method, "path": request.raw_path,
                              "query": dict(request.query), "body": body,
                              "headers": dict(request.headers)})
        if seen.answers:
            return seen.answers.pop(0)
        return web.json_response({"ok": True, "path": request.match_info["tail"]})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield str(test_server.make_url("")).rstrip("/"), seen
    finally:
        await test_server.close()


def spec(method: str = "GET", path: str = "/accounts/{domain}", **extra: Any) -> ToolSpec:
    return ToolSpec(name="crm.x", http={"service": "crm", "method": method, "path": path},
                    parameters={"type": "object", "properties": {
                        "domain": {"type": "string"}, "lead_id": {"type": "string"}}},
                    **extra)


async def test_get_fills_path_and_query_and_sends_headers(
        server: tuple[str, Seen]) -> None:
    url, seen = server
    http = HttpTools({"crm": url + "/"})
    try:
        result = await http.call(spec(), {"domain": "a/b c.io", "limit": 5, "all": True,
                                          "skip": None}, CALL)
    finally:
        await http.close()
    assert result == {"ok": True, "path": "accounts/a/b c.io"}
    request = seen.requests[0]
    assert request["path"].startswith("/accounts/a%2Fb%20c.io?")
    assert request["query"] == {"limit": "5", "all": "true"}
    assert request["headers"]["Idempotency-Key"] == "run-1:step:3"
    assert request["headers"]["X-Tenant"] == "acme"
    assert request["headers"]["X-Agent"] == "wf.step"
    assert request["body"] == ""


async def test_post_sends_the_other_arguments_as_json(server: tuple[str, Seen]) -> None:
    url, seen = server
    seen.answers.append(web.Response(status=204))
    async with _http(url) as http:
        result = await http.call(spec("POST", "/leads/{lead_id}/score"),
                                 {"lead_id": "L-1", "score": 80, "owner": None}, CALL)
    assert result is None
    assert seen.requests[0]["path"] == "/leads/L-1/score"
    import json

    assert json.loads(seen.requests[0]["body"]) == {"score": 80, "owner": None}


async def test_text_answers_are_returned_as_text(server: tuple[str, Seen]) -> None:
    url, seen = server
    seen.answers.append(web.Response(text="plain"))
    async with _http(url) as http:
        assert await http.call(spec(), {"domain": "x.io"}, CALL) == "plain"


@pytest.mark.parametrize(("status", "headers", "retry_after"), [
    (503, {"Retry-After": "2"}, 2.0),
    (429, {"Retry-After": "0.5"}, 0.5),
    (500, {"Retry-After": "2"}, None),  # only 429 and 503 say when to come back
    (502, {}, None),
    (408, {}, None),
])
async def test_transient_statuses(server: tuple[str, Seen], status: int,
                                  headers: dict[str, str], retry_after: float | None) -> None:
    url, seen = server
    seen.answers.append(web.json_response({"error": "busy"}, status=status, headers=headers))
    async with _http(url) as http:
        with pytest.raises(ServiceUnavailableError) as caught:
            await http.call(spec(), {"domain": "x.io"}, CALL)
    assert caught.value.status == status
    assert caught.value.retry_after_s == retry_after
    assert f"answered {status}: busy" in caught.value.reason


async def test_client_errors_are_permanent_with_sanitized_text(
        server: tuple[str, Seen]) -> None:
    url, seen = server
    seen.answers.append(web.json_response(
        {"error": "bad token Bearer abcdefghijklmnop\nfor lead"}, status=401))
    seen.answers.append(web.Response(text="x" * 5000, status=400))
    async with _http(url) as http:
        with pytest.raises(ToolError) as caught:
            await http.call(spec(), {"domain": "x.io"}, CALL)
        assert "abcdefghijklmnop" not in caught.value.reason
        assert "refused the call (401): bad token Bearer [redacted] for lead" in \
            caught.value.reason
        with pytest.raises(ToolError) as caught:
            await http.call(spec(), {"domain": "x.io"}, CALL)
        assert len(caught.value.reason) < 500


async def test_invalid_json_answer_is_a_tool_error(server: tuple[str, Seen]) -> None:
    url, seen = server
    seen.answers.append(web.Response(text="{oops", content_type="application/json"))
    async with _http(url) as http:
        with pytest.raises(ToolError, match="invalid JSON"):
            await http.call(spec(), {"domain": "x.io"}, CALL)


async def test_connection_refused_is_transient() -> None:
    async with _http(f"http://127.0.0.1:{free_port()}") as http:
        with pytest.raises(ServiceUnavailableError, match="may be down"):
            await http.call(spec(), {"domain": "x.io"}, CALL)


async def test_unknown_service_and_missing_path_argument() -> None:
    async with _http("http://127.0.0.1:1") as http:
        with pytest.raises(ConfigError, match="service_urls"):
            await http.call(ToolSpec(name="x.y", http={"service": "nope"}), {}, CALL)
        with pytest.raises(ToolError, match="'domain' is missing"):
            await http.call(spec(), {}, CALL)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("-1") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


class _http:
    def __init__(self, url: str) -> None:
        self.tools = HttpTools({"crm": url})

    async def __aenter__(self) -> HttpTools:
        return self.tools

    async def __aexit__(self, *exc: object) -> None:
        await self.tools.close()
