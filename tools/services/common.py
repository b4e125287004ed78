"""What the sample services share: tenants, idempotent writes, statistics, injected faults,
JSON errors, the control routes and the server start-up.

A request passes one middleware before its handler:

    route known? -> count the call -> tenant (X-Tenant) -> injected fault? -> handler
                                                           (latency, status)
                 -> count the answer's status

Control routes (``/healthz``, ``/_stats``, ``/_faults``, ``/_reset``) skip the counting and
the faults. State lives in memory, in the application, and is lost at restart.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentfabric.errors import PortInUseError

__all__ = [
    "STATE",
    "ApiError",
    "FaultSpec",
    "ServiceHandle",
    "ServiceState",
    "apply_once",
    "create_service_app",
    "idempotency_key",
    "load_csv",
    "parse_body",
    "path_param",
    "serve",
    "stored_record",
    "tenant_of",
]

TENANT_HEADER = "X-Tenant"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_TENANT = "default"
CONTROL_ROUTES = frozenset({"/healthz", "/_stats", "/_faults", "/_reset"})
MAX_ARRIVALS = 10_000  # arrival times kept per tenant
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces

M = TypeVar("M", bound=BaseModel)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer of status ``status`` with the JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        return web.json_response({"error": self.message}, status=self.status)


class FaultSpec(BaseModel):
    """``POST /_faults``: answer matching requests with ``status`` (null: only the latency),
    for the next ``count`` of them (null: until ``DELETE /_faults``), after ``latency_ms``."""

    model_config = ConfigDict(extra="forbid")
    status: int | None = Field(default=503, ge=400, le=599)
    count: int | None = Field(default=None, ge=1)
    latency_ms: int = Field(default=0, ge=0, le=120_000)
    routes: list[str] | None = Field(default=None, min_length=1)

    def matches(self, route: str) -> bool:
        return self.routes is None or route in self.routes or route.split(" ", 1)[1] in self.routes


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    repeats: int = 0
    by_tenant: Counter[str] = field(default_factory=Counter)
    # per tenant, the arrival time (Unix seconds) of each counted request: what a test of a
    # rate limit reads (the last MAX_ARRIVALS per tenant)
    arrivals: dict[str, deque[float]] = field(default_factory=dict)

    def arrived(self, tenant: str) -> None:
        self.by_tenant[tenant] += 1
        self.arrivals.setdefault(tenant, deque(maxlen=MAX_ARRIVALS)).append(time.time())

    def as_json(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "statuses": dict(self.statuses),
                "applied": self.applied, "repeats": self.repeats,
                "by_tenant": dict(self.by_tenant),
                "arrivals": {tenant: list(times) for tenant, times in self.arrivals.items()}}


@dataclass
class ServiceState:
    """One service's memory: per-tenant tables of written records, the results of applied
    writes by (tenant, route, idempotency key), the statistics and the active fault."""

    name: str
    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    writes: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    fault: FaultSpec | None = None
    fault_left: int | None = None

    def table(self, tenant: str, name: str) -> dict[str, dict[str, Any]]:
        return self.tables.setdefault(f"{tenant}/{name}", {})

    def take_fault(self, route: str) -> FaultSpec | None:
        fault = self.fault
        if fault is None or not fault.matches(route):
            return None
        if self.fault_left is not None:
            self.fault_left -= 1
            if self.fault_left <= 0:
                self.fault, self.fault_left = None, None
        return fault

    def reset(self) -> None:
        self.tables.clear()
        self.writes.clear()
        self.stats = Stats()
        self.fault, self.fault_left = None, None


STATE = web.AppKey("agentfabric_service_state", ServiceState)


@dataclass(frozen=True)
class ServiceHandle:
    """A service started by :func:`serve`; ``url`` is its base URL (no trailing slash)."""

    name: str
    host: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


def load_csv(name: str) -> list[dict[str, str]]:
    """Rows of a seed table shipped in ``services/data``."""
    text = resources.files("tools.services").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


def tenant_of(request: web.Request) -> str:
    """The request's tenant (``X-Tenant``, default "default"); 400 if it is malformed."""
    tenant = request.headers.get(TENANT_HEADER, DEFAULT_TENANT)
    if not _TENANT.fullmatch(tenant):
        raise ApiError(400, f"{TENANT_HEADER} must be 1 to 64 letters, digits, '.', '_' or "
                            f"'-', starting with a letter or digit")
    return tenant


def path_param(request: web.Request, name: str, pattern: re.Pattern[str], what: str) -> str:
    value = request.match_info[name]
    if not pattern.fullmatch(value):
        raise ApiError(400, f"{value!r} is not a valid {what}")
    return value


def stored_record(request: web.Request, table: str, param: str, pattern: re.Pattern[str],
                  what: str, missing: str) -> web.Response:
    """``GET`` of one record a write stored in this tenant's ``table``: the path parameter
    ``param`` names it; 404 says ``missing`` (formatted with ``id`` and ``tenant``)."""
    record_id = path_param(request, param, pattern, what)
    tenant = tenant_of(request)
    found = request.app[STATE].table(tenant, table).get(record_id)
    if found is None:
        raise ApiError(404, missing.format(id=record_id, tenant=tenant))
    return web.json_response(found)


async def parse_body(request: web.Request, model: type[M]) -> M:
    """The JSON body as ``model``; 400 naming every problem if it does not fit."""
    raw = await request.read()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        problems = "; ".join(
            (".".join(map(str, e["loc"])) + ": " if e["loc"] else "") + e["msg"]
            for e in exc.errors(include_url=False))
        raise ApiError(400, f"invalid request body: {problems}") from None


def idempotency_key(request: web.Request) -> str:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        raise ApiError(400, f"a write needs an {IDEMPOTENCY_HEADER} header (any unique string "
                            f"per intended change; repeats return the first result)")
    if not _KEY.fullmatch(key):
        raise ApiError(400, f"the {IDEMPOTENCY_HEADER} header must be 1 to 200 printable "
                            f"ASCII characters without spaces")
    return key


def apply_once(request: web.Request, key: str,
               apply: Callable[[str], dict[str, Any]]) -> web.Response:
    """Run ``apply(tenant)`` once per (tenant, route, key): the first time it answers its
    result with ``applied: true``; a repeat answers that same result with ``applied: false``."""
    state = request.app[STATE]
    tenant = tenant_of(request)
    slot = (tenant, _route_key(request) or request.path, key)
    done = state.writes.get(slot)
    if done is not None:
        state.stats.repeats += 1
        return web.json_response({**done, "applied": False})
    result = apply(tenant)  # synchronous: no other request runs between lookup and store
    state.writes[slot] = result
    state.stats.applied += 1
    return web.json_response({**result, "applied": True})


def _route_key(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return f"{request.method} {resource.canonical}"


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    return ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}").response()


@web.middleware
async def _pipeline(request: web.Request, handler: _Handler) -> web.StreamResponse:
    state = request.app[STATE]
    route = _route_key(request)
    counted = route is not None and route.split(" ", 1)[1] not in CONTROL_ROUTES
    if counted:
        state.stats.calls[str(route)] += 1
    response: web.StreamResponse
    try:
        if counted:
            state.stats.arrived(tenant_of(request))
            fault = state.take_fault(str(route))
            if fault is not None:
                if fault.latency_ms:
                    await asyncio.sleep(fault.latency_ms / 1000)
                if fault.status is not None:
                    raise ApiError(fault.status, f"injected fault: {state.name} answers "
                                                 f"{fault.status} for {route}")
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_error(request, exc)
    if counted:
        state.stats.statuses[str(response.status)] += 1
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "service": request.app[STATE].name})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats.as_json())


async def _set_fault(request: web.Request) -> web.Response:
    spec = await parse_body(request, FaultSpec)
    known = _business_routes(request.app)
    unknown = [r for r in spec.routes or () if r not in known
               and not any(k.split(" ", 1)[1] == r for k in known)]
    if unknown:
        raise ApiError(400, f"unknown routes {unknown}; use 'METHOD /template' or '/template' "
                            f"of: {sorted(known)}")
    state = request.app[STATE]
    state.fault, state.fault_left = spec, spec.count
    return web.json_response({"fault": spec.model_dump()})


async def _clear_fault(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.fault, state.fault_left = None, None
    return web.json_response({"fault": None})


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"reset": True})


def _business_routes(app: web.Application) -> set[str]:
    return {f"{route.method} {route.resource.canonical}" for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"
            and route.resource.canonical not in CONTROL_ROUTES}


def create_service_app(name: str, add_routes: Callable[[web.Application], None],
                       ) -> web.Application:
    """A service application: the shared middleware and control routes, plus its own."""
    app = web.Application(middlewares=[_pipeline])
    app[STATE] = ServiceState(name)
    add_routes(app)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/_stats", _stats)
    app.router.add_post("/_faults", _set_fault)
    app.router.add_delete("/_faults", _clear_fault)
    app.router.add_post("/_reset", _reset)
    return app


async def serve(name: str, app: web.Application, host: str = "127.0.0.1",
                port: int = 0) -> ServiceHandle:
    """Start serving ``app`` on ``host:port`` (0 picks a free port)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"the {name} service cannot bind {host}:{port}: the port is "
                                 f"taken; pick another port (--port)") from exc
        raise
    actual = next(addr[1] for addr in runner.addresses if isinstance(addr, tuple))
    return ServiceHandle(name, host, int(actual), runner)
