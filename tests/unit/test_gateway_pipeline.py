"""The gateway's stages, each on in-memory fakes (rate limiter, breakers, audit sink,
approval grants) with Python tools and a local aiohttp server for HTTP tools: identity and
scopes, argument validation, approval, rate limit, breaker, timeout, retry, fallback,
result limits and redaction, audit events and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import BaseModel

from agentfabric.errors import (
    ApprovalRequired,
    CircuitOpenError,
    RateLimitedError,
    ScopeError,
    ToolArgumentsError,
    ToolError,
    TransientError,
)
from agents.recording import ToolCaller
from tools.gateway.audit import MemoryAuditSink, arguments_hash
from tools.gateway.breaker import MemoryBreakers
from tools.gateway.catalog import Catalog
from tools.gateway.http import HttpTools
from tools.gateway.identity import Identity
from tools.gateway.metrics import GatewayMetrics
from tools.gateway.pipeline import Gateway, MemoryApprovalGrants, ToolTimeoutError
from tools.gateway.ratelimit import MemoryRateLimiter
from tools.gateway.spec import ToolSpec
from tools.registry import ToolCall

SECRET = "k" * 48
OBJECT = {"type": "object"}


class Harness:
    """A gateway over in-memory fakes; ``sleeps`` records the backoff delays asked for."""

    def __init__(self, catalog: Catalog, *, service_url: str = "http://127.0.0.1:1",
                 require_token: bool = True, clock: Callable[[], float] | None = None,
                 ) -> None:
        self.catalog = catalog
        self.audit = MemoryAuditSink()
        self.metrics = GatewayMetrics()
        self.grants = MemoryApprovalGrants()
        self.breakers = MemoryBreakers()
        self.sleeps: list[float] = []
        self.identity = Identity(catalog, SECRET, **({"clock": clock} if clock else {}))
        self.gateway = Gateway(
            catalog, self.identity, rate_limiter=MemoryRateLimiter(), breakers=self.breakers,
            audit=self.audit, metrics=self.metrics, grants=self.grants,
            http=HttpTools({"svc": service_url}), default_timeout_s=5,
            require_token=require_token, sleep=self.sleep, jitter=lambda: 1.0)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def call(self, tool: str, *tools: str, tenant: str = "acme", key: str = "run-1:s:1",
             token: str | None = None) -> ToolCall:
        if token is None:
            token = self.identity.mint("wf.step", tenant, [tool, *tools])
        return ToolCall(tool=tool, idempotency_key=key, tenant=tenant, run_id="run-1",
                        agent="wf.step", token=token, workflow="wf", step="step")

    async def __call__(self, tool: str, arguments: dict[str, Any], *tools: str,
                       **kw: Any) -> Any:
        return await self.gateway.call(tool, arguments, self.call(tool, *tools, **kw))


class Recorder:
    """A Python tool that records its calls and answers (or raises) from a script."""

    def __init__(self, *answers: Any) -> None:
        self.calls: list[tuple[dict[str, Any], ToolCall]] = []
        self.answers = list(answers)

    async def __call__(self, args: dict[str, Any], call: ToolCall) -> Any:
        self.calls.append((args, call))
        answer = self.answers.pop(0) if self.answers else {"ok": True}
        if isinstance(answer, BaseException):
            raise answer
        return answer


def python_catalog(*specs: tuple[ToolSpec, Any]) -> Catalog:
    from tools.gateway.catalog import PythonTool

    catalog = Catalog()
    for spec, fn in specs:
        catalog.add(spec, PythonTool(fn, None, True, True))
    return catalog


def tool(name: str = "crm.lookup", **extra: Any) -> ToolSpec:
    extra.setdefault("parameters", OBJECT)
    return ToolSpec(name=name, source="test", **extra)


# ---------------------------------------------------------------- identity and scopes


async def test_an_allowed_call_is_audited_without_its_arguments() -> None:
    fn = Recorder({"name": "Acme"})
    h = Harness(python_catalog((tool(scopes=["crm:read"]), fn)))
    assert await h("crm.lookup", {"domain": "acme.io"}) == {"name": "Acme"}
    args, call = fn.calls[0]
    assert args == {"domain": "acme.io"}
    assert call.idempotency_key == "run-1:s:1"
    [event] = h.audit.events
    assert (event.outcome, event.agent, event.workflow, event.step, event.tenant) == \
        ("ok", "wf.step", "wf", "step", "acme")
    assert event.arguments_hash == arguments_hash({"domain": "acme.io"})
    assert "acme.io" not in event.model_dump_json()
    assert event.attempts == 1
    assert event.access == "read"
    assert h.metrics.calls.labels("crm.lookup", "ok")._value.get() == 1


async def test_an_undeclared_tool_is_refused() -> None:
    fn = Recorder()
    h = Harness(python_catalog((tool(), fn), (tool("erp.pay", access="write"), fn)))
    call = h.call("erp.pay", token=h.identity.mint("wf.step", "acme", ["crm.lookup"]))
    with pytest.raises(ScopeError, match=r"may not call tool 'erp.pay'.*allows crm.lookup"):
        await h.gateway.call("erp.pay", {}, call)
    assert fn.calls == []
    assert h.audit.outcomes() == ["refused"]


async def test_a_missing_scope_is_refused() -> None:
    fn = Recorder()
    h = Harness(python_catalog((tool(scopes=["crm:read", "crm:pii"]), fn)))
    # a token minted where the tool needed fewer scopes (another catalog, the same secret)
    old = Identity(python_catalog((tool(scopes=["crm:read"]), fn)), SECRET)
    call = h.call("crm.lookup", token=old.mint("wf.step", "acme", ["crm.lookup"]))
    with pytest.raises(ScopeError, match=r"lacks the scope\(s\) crm:pii"):
        await h.gateway.call("crm.lookup", {}, call)
    assert fn.calls == []
    assert h.audit.outcomes() == ["refused"]


async def test_an_expired_token_is_refused() -> None:
    now = [1000.0]
    fn = Recorder()
    h = Harness(python_catalog((tool(), fn)), clock=lambda: now[0])
    call = h.call("crm.lookup", token=h.identity.mint("wf.step", "acme", ["crm.lookup"],
                                                      ttl_s=60))
    await h.gateway.call("crm.lookup", {}, call)
    now[0] += 61
    with pytest.raises(ScopeError, match="expired"):
        await h.gateway.call("crm.lookup", {}, call)
    assert len(fn.calls) == 1
    assert h.audit.outcomes() == ["ok", "refused"]


async def test_another_tenants_token_is_refused() -> None:
    fn = Recorder()
    h = Harness(python_catalog((tool(), fn)))
    call = h.call("crm.lookup", tenant="globex",
                  token=h.identity.mint("wf.step", "acme", ["crm.lookup"]))
    with pytest.raises(ScopeError, match="tenant 'acme', the call for tenant 'globex'"):
        await h.gateway.call("crm.lookup", {}, call)
    assert fn.calls == []


async def test_calls_without_a_token() -> None:
    fn = Recorder()
    strict = Harness(python_catalog((tool(), fn)))
    bare = ToolCall(tool="crm.lookup", idempotency_key="k", tenant="acme", run_id="r")
    with pytest.raises(ScopeError, match="without an agent token"):
        await strict.gateway.call("crm.lookup", {}, bare)
    lenient = Harness(python_catalog((tool(), fn)), require_token=False)
    assert await lenient.gateway.call("crm.lookup", {}, bare) == {"ok": True}
    assert lenient.audit.events[0].agent == "anonymous"
    # an agent without a token is refused even then: the engine should have minted one
    claimed = ToolCall(tool="crm.lookup", idempotency_key="k", tenant="acme", run_id="r",
                       agent="wf.step")
    with pytest.raises(ScopeError):
        await lenient.gateway.call("crm.lookup", {}, claimed)
    other = ToolCall(tool="crm.lookup", idempotency_key="k", tenant="acme", run_id="r",
                     agent="wf.other", token=strict.call("crm.lookup").token)
    with pytest.raises(ScopeError, match=r"its token is agent 'wf.step'"):
        await strict.gateway.call("crm.lookup", {}, other)


async def test_an_unknown_tool_is_a_tool_error_and_audited() -> None:
    h = Harness(python_catalog((tool(), Recorder())))
    with pytest.raises(ToolError, match=r"no tool named 'crm.nope'"):
        await h.gateway.call("crm.nope", {}, h.call("crm.lookup"))
    await h.gateway.refuse("crm.lookup", "not json", h.call("crm.lookup"), "model sent junk")
    assert h.audit.outcomes() == ["refused", "refused"]
    assert h.audit.events[1].reason == "model sent junk"


def test_the_gateway_is_a_tool_caller() -> None:
    h = Harness(python_catalog((tool(description="Find it."), Recorder())))
    caller: ToolCaller = h.gateway
    info = caller.get("crm.lookup")
    assert (info.name, info.description, info.parameters) == ("crm.lookup", "Find it.", OBJECT)
    assert caller.names() == ["crm.lookup"]


# ---------------------------------------------------------------- arguments and approval


async def test_invalid_arguments_never_reach_the_system(
        service: tuple[str, list[dict[str, Any]], list[web.Response]]) -> None:
    url, requests, _ = service
    spec = ToolSpec(name="erp.validate", http={"service": "svc", "method": "POST",
                                               "path": "/validate"},
                    parameters={"type": "object", "required": ["amount", "due"],
                                "additionalProperties": False, "properties": {
                                    "amount": {"type": "number"},
                                    "due": {"type": "string", "format": "date"}}})
    h = Harness(Catalog.of([spec]), service_url=url)
    with pytest.raises(ToolArgumentsError) as caught:
        await h("erp.validate", {"amount": "lots", "due": "2024-02-30"})
    assert "at amount: 'lots' is not of type 'number'" in caught.value.reason
    assert "at due: '2024-02-30' is not a 'date'" in caught.value.reason
    with pytest.raises(ToolArgumentsError, match="'extra' was unexpected"):
        await h("erp.validate", {"amount": 1, "due": "2024-02-28", "extra": 1})
    assert requests == []
    assert h.audit.outcomes() == ["invalid_arguments", "invalid_arguments"]
    assert await h("erp.validate", {"amount": 1, "due": "2024-02-28"}) == {"ok": True}
    assert len(requests) == 1
    await h.gateway.close()


async def test_a_python_tools_model_validates_its_arguments() -> None:
    class Args(BaseModel):
        n: int

    catalog = Catalog()
    catalog.register("calc.double", Args)(lambda args: args.n * 2)
    h = Harness(catalog)
    assert await h("calc.double", {"n": 4}) == 8
    with pytest.raises(ToolArgumentsError, match="n"):
        await h("calc.double", {"n": "four"})


async def test_approval_needed_above_the_threshold() -> None:
    fn = Recorder()
    spec = tool("erp.pay", access="write", approval={
        "when": "args.amount > 10000", "reason": "{{ tool }} of {{ args.amount }} needs "
                                                 "approval", "expires_s": 600})
    h = Harness(python_catalog((spec, fn)))
    assert await h("erp.pay", {"amount": 500}) == {"ok": True}
    with pytest.raises(ApprovalRequired) as caught:
        await h("erp.pay", {"amount": 25000}, key="run-1:pay:1")
    assert caught.value.tool == "erp.pay"
    assert caught.value.call_key == "run-1:pay:1"
    assert caught.value.expires_s == 600
    assert caught.value.reason == "erp.pay of 25000 needs approval"
    assert len(fn.calls) == 1
    h.grants.grant("run-1:pay:1")
    assert await h("erp.pay", {"amount": 25000}, key="run-1:pay:1") == {"ok": True}
    assert h.audit.outcomes() == ["ok", "approval_required", "ok"]


async def test_an_approval_condition_that_cannot_be_evaluated_asks_a_person() -> None:
    h = Harness(python_catalog((tool("erp.pay", approval={"when": "args.amount > 10"}),
                                Recorder())))
    with pytest.raises(ApprovalRequired, match="could not be evaluated"):
        await h("erp.pay", {})


# ---------------------------------------------------------------- retry, timeout, breaker


@pytest.fixture
async def service() -> AsyncIterator[tuple[str, list[dict[str, Any]], list[web.Response]]]:
    """A local HTTP service: answers ``answers`` in order (then 200 {"ok": true}); records
    each request's path, headers and body."""
    requests: list[dict[str, Any]] = []
    answers: list[web.Response] = []

    async def handle(request: web.Request) -> web.Response:
        requests.append({"path": request.path, "headers": dict(request.headers),
                         "body": await request.text()})
        return answers.pop(0) if answers else web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), requests, answers
    finally:
        await server.close()


def http_spec(**extra: Any) -> ToolSpec:
    return ToolSpec(name="crm.score", access="write", parameters={
        "type": "object", "properties": {"lead_id": {"type": "string"}}},
        http={"service": "svc", "method": "POST", "path": "/leads/{lead_id}/score"},
        **extra)


async def test_retries_send_the_same_idempotency_key(
        service: tuple[str, list[dict[str, Any]], list[web.Response]]) -> None:
    url, requests, answers = service
    answers += [web.json_response({"error": "down"}, status=503),
                web.json_response({"error": "slow down"}, status=429,
                                  headers={"Retry-After": "0.7"})]
    h = Harness(Catalog.of([http_spec(retry={"attempts": 3, "backoff_s": 0.1,
                                             "max_backoff_s": 1})]), service_url=url)
    assert await h("crm.score", {"lead_id": "L1", "score": 5}, key="run-1:score:1") == \
        {"ok": True}
    await h.gateway.close()
    assert [r["headers"]["Idempotency-Key"] for r in requests] == ["run-1:score:1"] * 3
    assert [r["headers"]["X-Tenant"] for r in requests] == ["acme"] * 3
    assert h.sleeps == [0.1, 0.7]  # backoff 0.1 (jitter 1.0), then the service's Retry-After
    [event] = h.audit.events
    assert (event.outcome, event.attempts) == ("ok", 3)


async def test_retry_backoff_grows_with_jitter_and_is_capped() -> None:
    fn = Recorder(*[TransientError("flaky")] * 5)
    h = Harness(python_catalog((tool(retry={"attempts": 6, "backoff_s": 1,
                                             "max_backoff_s": 5},
                                      breaker={"failures": 100}), fn)))
    h.gateway = Gateway(h.catalog, h.identity, rate_limiter=MemoryRateLimiter(),
                        breakers=h.breakers, audit=h.audit, sleep=h.sleep, jitter=lambda: 0.0)
    await h("crm.lookup", {})
    assert h.sleeps == [0.5, 1.0, 2.0, 2.5, 2.5]  # half the capped delay at jitter 0


async def test_permanent_errors_and_long_retry_after_are_not_retried(
        service: tuple[str, list[dict[str, Any]], list[web.Response]]) -> None:
    url, requests, answers = service
    answers += [web.json_response({"error": "score: must be <= 100"}, status=400),
                web.json_response({"error": "maintenance"}, status=503,
                                  headers={"Retry-After": "120"})]
    h = Harness(Catalog.of([http_spec()]), service_url=url)
    with pytest.raises(ToolError, match=r"refused the call \(400\): score: must be <= 100"):
        await h("crm.score", {"lead_id": "L1"})
    with pytest.raises(TransientError, match="maintenance"):
        await h("crm.score", {"lead_id": "L1"})
    await h.gateway.close()
    assert len(requests) == 2
    assert h.sleeps == []
    assert h.audit.outcomes() == ["error", "error"]


async def test_a_timeout_is_transient_and_retried() -> None:
    never = asyncio.Event()
    calls = []

    async def hangs(args: dict[str, Any], call: ToolCall) -> Any:
        calls.append(1)
        await never.wait()

    h = Harness(python_catalog((tool(timeout_s=0.05, retry={"attempts": 2,
                                                             "backoff_s": 0}), hangs)))
    with pytest.raises(ToolTimeoutError, match=r"within 0.05 s") as caught:
        await h("crm.lookup", {})
    assert isinstance(caught.value, TransientError)
    assert len(calls) == 2
    [event] = h.audit.events
    assert (event.outcome, event.attempts) == ("timeout", 2)


async def test_an_open_breaker_stops_calls(
        service: tuple[str, list[dict[str, Any]], list[web.Response]]) -> None:
    url, requests, answers = service
    answers += [web.Response(status=502) for _ in range(3)]
    spec = http_spec(retry={"attempts": 1}, breaker={"failures": 3, "window_s": 60,
                                                     "open_s": 60})
    h = Harness(Catalog.of([spec]), service_url=url)
    for _ in range(3):
        with pytest.raises(TransientError):
            await h("crm.score", {"lead_id": "L1"})
    with pytest.raises(CircuitOpenError, match=r"breaker of tool 'crm.score' is open"):
        await h("crm.score", {"lead_id": "L1"})
    await h.gateway.close()
    assert len(requests) == 3  # the fourth call never left
    assert h.audit.outcomes() == ["error", "error", "error", "circuit_open"]
    assert h.metrics.breaker.labels("crm.score")._value.get() == 2
    assert "crm.score: 4 calls, 4 failed, breaker open" in h.gateway.summary()[0]


async def test_permanent_failures_do_not_open_the_breaker() -> None:
    fn = Recorder(*[ToolError("no such lead")] * 3)
    h = Harness(python_catalog((tool(breaker={"failures": 2}), fn)))
    for _ in range(3):
        with pytest.raises(ToolError):
            await h("crm.lookup", {})
    assert await h("crm.lookup", {}) == {"ok": True}
    assert await h.breakers.state("crm.lookup", tool().breaker) == "closed"


async def test_each_retry_attempt_is_admitted_by_the_breaker() -> None:
    fn = Recorder(TransientError("a"), TransientError("b"), TransientError("c"))
    h = Harness(python_catalog((tool(retry={"attempts": 5, "backoff_s": 0},
                                     breaker={"failures": 2, "open_s": 60}), fn)))
    with pytest.raises(CircuitOpenError):
        await h("crm.lookup", {})
    assert len(fn.calls) == 2  # the third attempt found the breaker open
    assert h.audit.events[0].outcome == "circuit_open"


# ---------------------------------------------------------------- fallback


async def test_breaker_open_falls_back_to_another_tool() -> None:
    primary = Recorder(TransientError("down"))
    cached = Recorder({"name": "Acme (cached)"})
    h = Harness(python_catalog(
        (tool("crm.get_account", retry={"attempts": 1}, breaker={"failures": 1},
              fallback={"tool": "crm.get_account_cached"}), primary),
        (tool("crm.get_account_cached"), cached)))
    call = h.call("crm.get_account")  # the token names only the primary
    first = await h.gateway.call("crm.get_account", {"domain": "acme.io"}, call)
    assert first == {"name": "Acme (cached)"}
    assert call.degraded == ["crm.get_account: answered by fallback crm.get_account_cached "
                             "(failed after 1 attempt)"]
    call = h.call("crm.get_account")
    await h.gateway.call("crm.get_account", {"domain": "acme.io"}, call)
    assert call.degraded == ["crm.get_account: answered by fallback crm.get_account_cached "
                             "(circuit open)"]
    assert len(primary.calls) == 1
    assert len(cached.calls) == 2
    assert cached.calls[0][1].tool == "crm.get_account_cached"
    # each fallback tool call is audited, and the primary as answered by its fallback
    assert [(e.tool, e.outcome) for e in h.audit.events] == [
        ("crm.get_account_cached", "ok"), ("crm.get_account", "fallback"),
        ("crm.get_account_cached", "ok"), ("crm.get_account", "fallback")]
    assert "circuit open" in h.audit.events[3].reason


async def test_fallback_answer_after_retries() -> None:
    fn = Recorder(ConnectionError("reset"), ConnectionError("reset"))
    h = Harness(python_catalog((tool(retry={"attempts": 2, "backoff_s": 0},
                                     fallback={"answer": {"score": 0}}), fn)))
    call = h.call("crm.lookup")
    assert await h.gateway.call("crm.lookup", {}, call) == {"score": 0}
    assert call.degraded == ["crm.lookup: answered by its fallback answer (failed after 2 "
                             "attempts)"]
    assert h.audit.outcomes() == ["fallback"]


async def test_a_failing_fallback_raises_both_reasons() -> None:
    h = Harness(python_catalog(
        (tool("a.one", retry={"attempts": 1}, fallback={"tool": "a.two"}),
         Recorder(TransientError("one is down"))),
        (tool("a.two", retry={"attempts": 1}), Recorder(ToolError("two is broken")))))
    with pytest.raises(TransientError, match=r"one is down; its fallback a.two failed too: "
                                             r"two is broken"):
        await h("a.one", {})


async def test_permanent_errors_do_not_fall_back() -> None:
    h = Harness(python_catalog((tool(fallback={"answer": 1}), Recorder(ToolError("no")))))
    with pytest.raises(ToolError):
        await h("crm.lookup", {})


# ---------------------------------------------------------------- rate limit and result


async def test_rate_limited_calls_fail_transiently_and_are_counted() -> None:
    fn = Recorder()
    h = Harness(python_catalog((tool(rate_limit={"limit": 1, "period_s": 60,
                                                  "max_wait_s": 0}), fn)))
    await h("crm.lookup", {})
    with pytest.raises(RateLimitedError):
        await h("crm.lookup", {})
    await h("crm.lookup", {}, tenant="globex")  # limits are per tenant
    assert len(fn.calls) == 2
    assert h.audit.outcomes() == ["ok", "rate_limited", "ok"]
    assert h.metrics.rate_limited_calls.labels("crm.lookup")._value.get() == 1


async def test_result_size_limit_and_redaction() -> None:
    big = Recorder({"blob": "x" * 2000})
    h = Harness(python_catalog(
        (tool("a.big", max_result_bytes=1024), big),
        (tool("a.pii", redact=["owner.email", "contacts.phone"]),
         Recorder({"owner": {"email": "ceo@acme.io", "name": "Ann"},
                   "contacts": [{"phone": "1"}, {"phone": "2"}]}))))
    with pytest.raises(ToolError, match=r"answered 2\d{3} bytes, more than its "
                                        r"max_result_bytes \(1024\)"):
        await h("a.big", {})
    assert await h("a.pii", {}) == {"owner": {"email": "[redacted]", "name": "Ann"},
                                    "contacts": [{"phone": "[redacted]"},
                                                 {"phone": "[redacted]"}]}


async def test_tool_errors_are_sanitized() -> None:
    h = Harness(python_catalog(
        (tool("a.bug"), Recorder(RuntimeError("boom Authorization: Bearer abcdefghijkl\n"))),
        (tool("a.own"), Recorder(ToolError("refused: api_key=SECRETSECRET")))))
    with pytest.raises(ToolError) as caught:
        await h("a.bug", {})
    assert caught.value.reason == ("tool 'a.bug' failed with RuntimeError: boom "
                                   "Authorization: [redacted]")
    with pytest.raises(ToolError) as caught:
        await h("a.own", {})
    assert "SECRETSECRET" not in caught.value.reason
    assert all("abcdefghijkl" not in e.reason and "SECRET" not in e.reason
               for e in h.audit.events)


async def test_sync_python_tools_run_in_a_thread() -> None:
    import threading

    main = threading.get_ident()
    seen: list[int] = []

    def blocking(args: dict[str, Any]) -> str:
        seen.append(threading.get_ident())
        return "done"

    catalog = Catalog()
    from tools.gateway.catalog import PythonTool

    catalog.add(tool("a.sync"), PythonTool(blocking, None, False, False))
    h = Harness(catalog)
    assert await h("a.sync", {}) == "done"
    assert seen
    assert seen[0] != main
