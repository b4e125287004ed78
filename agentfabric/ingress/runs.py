"""The run API: ``POST /runs`` starts a workflow, ``GET /runs/{id}`` answers its status and
result, ``GET /runs/{id}/events`` streams its progress as server-sent events
(docs/runs-api.md).

Every request authenticates with a tenant's API key (``agentfabric.ingress.keys``); the
tenant of a run is the key's, never the body's, and a run of another tenant is answered as
unknown (404), so a key never learns whether another tenant's run exists. A run starts as
the router would start it: its first step message, Avro-encoded, keyed by run id, on the
first step's topic, sent with the broker's acknowledgement awaited. Its status comes from
the run store (``agentfabric.ingress.runstore``), which the server's background task fills
from the result topics.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from agentfabric import tracing
from agentfabric.errors import PermanentError, UnavailableError, UnknownWorkflowError
from agents.engine import first_message
from schemas.models import NAME_PATTERN, StepMessage, TriggerEvent, canonical_json, utc_now
from schemas.serde import validation_reason
from streams.batching import PipelinedRedis
from streams.claims import ClaimStore
from streams.codec import trace_header
from streams.kafka import Outgoing

from .keys import ApiKey, ApiKeyStore, presented_key
from .runstore import RunView, load_run, record_started

if TYPE_CHECKING:
    from agents.workflow import Workflow

    from .context import IngressContext

__all__ = ["API_SOURCE", "RunRequest", "run_routes"]

API_SOURCE = "api"  # the source of the trigger event of a run started through the API
RETRY_AFTER_S = 5
POLL_S = 0.2  # how often an event stream looks at the run store
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._-]{0,199}$")


class RunRequest(BaseModel):
    """The body of ``POST /runs``."""

    model_config = ConfigDict(extra="forbid")
    workflow: str = Field(pattern=NAME_PATTERN)
    input: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    tenant: str | None = Field(default=None, description="Optional; must be the key's tenant.")


def _ctx(request: Request) -> IngressContext:
    ctx: IngressContext = request.app.state.ctx
    return ctx


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None,
           ) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _unavailable(what: str) -> JSONResponse:
    return _error(503, "unavailable", f"{what} is unavailable; try again shortly",
                  {"Retry-After": str(RETRY_AFTER_S)})


def _links(run_id: str) -> dict[str, str]:
    return {"self": f"/runs/{run_id}", "events": f"/runs/{run_id}/events"}


async def _authenticate(request: Request) -> ApiKey | JSONResponse:
    """The caller's key, or the 401 (or 503) to answer."""
    presented = presented_key(request.headers.get("authorization"),
                              request.headers.get("x-api-key"))
    challenge = {"WWW-Authenticate": 'Bearer realm="agentfabric"'}
    if presented is None:
        return _error(401, "unauthenticated", "an API key is required: send 'Authorization: "
                      "Bearer <key>' (create one with `agentfabric keys create`)", challenge)
    ctx = _ctx(request)
    try:
        key = await ApiKeyStore(ctx.redis, ctx.settings.topic_prefix).verify(presented)
    except RedisError:
        return _unavailable("the key store (Redis)")
    if key is None:
        return _error(401, "invalid_api_key", "the API key is not valid or has been revoked",
                      challenge)
    return key


async def _body(request: Request, limit: int) -> bytes | JSONResponse:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, "too_large", f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _error(413, "too_large", f"the body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        return _error(400, "disconnected", "the client went away before sending the body")
    return b"".join(chunks)


def _parse(raw: bytes, key: ApiKey, header_key: str | None) -> RunRequest | JSONResponse:
    try:
        data = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return _error(400, "invalid_json", f"the body is not JSON ({exc})")
    if not isinstance(data, dict):
        return _error(422, "invalid_request", 'the body must be a JSON object: {"workflow": '
                      '"<name>", "input": {...}}')
    try:
        body = RunRequest.model_validate(data)
    except ValidationError as exc:
        return _error(422, "invalid_request", validation_reason(exc))
    if body.tenant is not None and body.tenant != key.tenant:
        return _error(403, "tenant_mismatch",
                      f"this API key belongs to tenant '{key.tenant}'; it cannot start runs "
                      f"for tenant '{body.tenant}' (leave 'tenant' out: runs take the key's "
                      f"tenant)")
    if header_key is not None:
        if body.idempotency_key is not None and body.idempotency_key != header_key:
            return _error(422, "invalid_request", "the Idempotency-Key header and the body's "
                          "idempotency_key differ; send one of them")
        if not 0 < len(header_key) <= 200:
            return _error(422, "invalid_request", "the Idempotency-Key header must have 1 to "
                          "200 characters")
        body = body.model_copy(update={"idempotency_key": header_key})
    return body


def _input_problem(wf: Workflow, payload: dict[str, Any]) -> str | None:
    """Why ``payload`` does not fit the workflow's declared input schema (None: it does)."""
    schema = wf.input_schema
    if not schema:
        return None
    import jsonschema

    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(payload))
    if error is None:
        return None
    where = "input" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}"
                              for p in error.absolute_path)
    return f"{where}: {error.message}"


def _started(msg: StepMessage, status: str) -> dict[str, Any]:
    return {"run_id": msg.run_id, "workflow": msg.workflow,
            "workflow_version": msg.workflow_version, "tenant": msg.tenant,
            "status": status, "links": _links(msg.run_id)}


async def start_run(request: Request) -> Response:
    """``POST /runs``: start the latest version of a workflow for the key's tenant."""
    key = await _authenticate(request)
    if isinstance(key, JSONResponse):
        return key
    ctx = _ctx(request)
    raw = await _body(request, ctx.settings.ingress_max_body_bytes)
    if isinstance(raw, JSONResponse):
        return raw
    body = _parse(raw, key, request.headers.get("idempotency-key"))
    if isinstance(body, JSONResponse):
        return body
    try:
        wf = ctx.workflows.latest(body.workflow)
    except UnknownWorkflowError:
        return _error(404, "unknown_workflow", f"there is no workflow '{body.workflow}' "
                      f"(loaded: {', '.join(ctx.workflows.names())})")
    problem = _input_problem(wf, body.input)
    if problem is not None:
        return _error(422, "invalid_input", f"the input does not fit workflow '{wf.name}': "
                      f"{problem}")
    event = TriggerEvent(event_id=body.idempotency_key or f"api:{uuid.uuid4()}",
                         source=API_SOURCE, event_type=f"run.{wf.name}", tenant=key.tenant,
                         workflow=wf.name, payload=body.input)
    with tracing.entry_span("POST /runs", request.headers.get("traceparent"),
                            {"http.request.method": "POST", "http.route": "/runs"},
                            workflow=wf.name, tenant=key.tenant) as span:
        msg = first_message(wf, event, utc_now(), span.traceparent)
        span.set(run_id=msg.run_id)
        answer = await _send_run(ctx, body, wf, msg, key)
        span.set({"http.response.status_code": answer.status_code})
        span.outcome(str(answer.status_code), error=None if answer.status_code < 500
                     else f"HTTP {answer.status_code}")
    return answer


async def _send_run(ctx: IngressContext, body: RunRequest, wf: Workflow, msg: StepMessage,
                    key: ApiKey) -> Response:
    """Publish the run's first message (once per idempotency key) and answer."""
    fingerprint = hashlib.sha256(canonical_json(
        {"workflow": wf.name, "input": body.input}).encode()).hexdigest()
    prefix, ttl = ctx.settings.topic_prefix, ctx.settings.idempotency_ttl_s
    try:
        if body.idempotency_key is not None:
            known = await load_run(ctx.redis, prefix, msg.run_id)
            if known is not None:
                view, started_by = known
                if started_by and started_by != fingerprint:
                    return _error(409, "idempotency_conflict",
                                  f"idempotency key '{body.idempotency_key}' already started "
                                  f"run {msg.run_id} with a different request; use a new key")
                return JSONResponse(_started(msg, view.status), status_code=200,
                                    headers={"Idempotent-Replayed": "true",
                                             "Location": _links(msg.run_id)["self"]})
        claims = ClaimStore(PipelinedRedis(ctx.redis), prefix, ttl,
                            ctx.settings.claim_check_bytes)
        outgoing = await claims.check([Outgoing.of(
            ctx.names.step(wf.name, msg.step), msg.run_id, msg, trace_header(msg))])
        await asyncio.wait_for(ctx.producer.send_all(outgoing),
                               ctx.settings.ingress_send_timeout_s)
        await record_started(ctx.redis, prefix, msg.run_id, key.tenant, wf.name, ttl,
                             request_hash=fingerprint)
    except RedisError:
        return _unavailable("the run store (Redis)")
    except (UnavailableError, TimeoutError):
        return _unavailable("the broker (Kafka)")
    except PermanentError as exc:
        return _error(500, "not_sent", f"the run could not be started: {exc.reason}")
    return JSONResponse(_started(msg, "running"), status_code=202,
                        headers={"Location": _links(msg.run_id)["self"]})


async def _own_run(request: Request) -> tuple[IngressContext, ApiKey, RunView] | JSONResponse:
    """The run named in the path if it is the caller's tenant's; else the 404 (or 401)."""
    key = await _authenticate(request)
    if isinstance(key, JSONResponse):
        return key
    ctx = _ctx(request)
    run_id: str = request.path_params["run_id"]
    not_found = _error(404, "unknown_run", f"there is no run '{run_id}' for this API key's "
                       f"tenant (runs are kept for AGENTFABRIC_IDEMPOTENCY_TTL_S)")
    if not _RUN_ID.match(run_id):
        return not_found
    try:
        known = await load_run(ctx.redis, ctx.settings.topic_prefix, run_id)
    except RedisError:
        return _unavailable("the run store (Redis)")
    if known is None or known[0].tenant != key.tenant:
        return not_found
    return ctx, key, known[0]


def _view(view: RunView) -> dict[str, Any]:
    data = view.model_dump(mode="json")
    if not view.finished:
        data.pop("output")
    if data["error"] is None:
        data.pop("error")
    return {**data, "links": _links(view.run_id)}


async def get_run(request: Request) -> Response:
    """``GET /runs/{run_id}``: the run's status, and its output once it has finished."""
    found = await _own_run(request)
    if isinstance(found, JSONResponse):
        return found
    return JSONResponse(_view(found[2]))


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(ctx: IngressContext, tenant: str, first: RunView) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    started = beat = loop.time()
    view: RunView | None = first
    last = ""
    while True:
        if view is None or view.tenant != tenant:
            yield _sse("error", {"message": "the run is no longer in the run store"})
            return
        if view.status != last:
            last = view.status
            yield _sse("status", {"run_id": view.run_id, "status": view.status})
        if view.finished:
            yield _sse("result", _view(view))
            return
        now = loop.time()
        if now - started >= ctx.settings.run_events_max_s:
            yield _sse("timeout", {"run_id": view.run_id, "message": "the stream reached "
                                   "AGENTFABRIC_RUN_EVENTS_MAX_S; reconnect to go on watching"})
            return
        if now - beat >= HEARTBEAT_S:
            beat = now
            yield ": keep-alive\n\n"
        await asyncio.sleep(POLL_S)
        try:
            known = await load_run(ctx.redis, ctx.settings.topic_prefix, first.run_id)
        except RedisError:
            yield _sse("error", {"message": "the run store (Redis) is unavailable; reconnect "
                                            "shortly"})
            return
        view = known[0] if known is not None else None


async def run_events(request: Request) -> Response:
    """``GET /runs/{run_id}/events``: server-sent events: ``status`` whenever the status
    changes, then ``result`` (the run, as ``GET /runs/{id}`` gives it) when it has finished;
    comment lines as heartbeats; the stream ends after AGENTFABRIC_RUN_EVENTS_MAX_S."""
    found = await _own_run(request)
    if isinstance(found, JSONResponse):
        return found
    ctx, key, view = found
    return StreamingResponse(_stream(ctx, key.tenant, view), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def run_routes() -> list[BaseRoute]:
    """The run API's routes, to mount on the ingress app (they read ``app.state.ctx``)."""
    return [Route("/runs", start_run, methods=["POST"]),
            Route("/runs/{run_id}", get_run, methods=["GET"]),
            Route("/runs/{run_id}/events", run_events, methods=["GET"])]
