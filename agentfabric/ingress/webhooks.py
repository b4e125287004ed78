"""``POST /webhooks/{source}``: verify, map to trigger events, dedupe, publish, answer.

The order of the checks: an unknown source is 404; a body over the source's limit 413
(read no further); a missing, stale or wrong signature 401 (400 if it cannot be read); a
body that is not JSON 400, that does not map to events 422, that names another tenant 403.
Nothing reaches Kafka unless every event of the delivery passed.

Then each event's runs are worked out (``run_id_for`` for every workflow it starts; an event
that starts none is answered as ``ignored`` and not published). Events delivered before (a
Redis key per source, tenant and event id, written only after the broker acknowledged them)
are answered with the run ids stored then, and not published again. The others are published
(acks=all, bounded by ``AGENTFABRIC_INGRESS_SEND_TIMEOUT_S``), signed for the authenticated
tenant (``af-tenant`` and ``af-tenant-sig``, see ``agentfabric.tenancy``); 202 comes only
once the broker acknowledged them. A broker or Redis that does not answer gives 503 with
``Retry-After``: the sender delivers again later, and the same event ids start the same runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentfabric import tracing
from agentfabric.errors import PermanentError, UnavailableError, UnroutableEventError
from agentfabric.tenancy import TenantSigner
from agents.engine import run_id_for
from schemas.models import TriggerEvent
from streams.codec import TRACE_HEADER
from streams.kafka import Outgoing

from .context import IngressContext
from .runstore import record_started
from .signatures import SignatureError, SignedRequest, verify
from .sources import DeliveryRejected, WebhookSource

__all__ = ["RETRY_AFTER_S", "error_response", "webhook_routes"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": message}, status_code=status, headers=headers)


def _unavailable(message: str) -> JSONResponse:
    return error_response(503, "unavailable", message, {"Retry-After": str(RETRY_AFTER_S)})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise DeliveryRejected(f"the body is {declared} bytes; this source accepts at most "
                               f"{limit}", status=413, code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise DeliveryRejected(f"the body is over {limit} bytes, the most this source "
                                   f"accepts", status=413, code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _uri(request: Request, source: WebhookSource) -> str:
    if source.config.public_url is None:
        return str(request.url)
    query = request.url.query
    return source.config.public_url + (f"?{query}" if query else "")


def _seen_key(ctx: IngressContext, source: WebhookSource, event: TriggerEvent) -> str:
    return (f"{ctx.settings.topic_prefix}:ingress:seen:{source.name}:{source.tenant}:"
            f"{event.event_id}")


async def receive(request: Request) -> Response:
    ctx: IngressContext = request.app.state.ctx
    sources: dict[str, WebhookSource] = request.app.state.sources
    name = request.path_params["source"]
    source = sources.get(name)
    if source is None:
        return error_response(404, "unknown_source", f"no webhook source '{name[:64]}' is "
                              f"configured (known: {', '.join(sorted(sources)) or 'none'})")
    try:
        body = await _read_body(request, source.max_body_bytes)
        headers = {k.lower(): v for k, v in request.headers.items()}
        verify(source.config.scheme,
               SignedRequest(request.method, _uri(request, source), body, headers),
               source.secret, header=source.config.signature_header,
               tolerance_s=source.config.tolerance_s)
        events = source.events(body, headers)
        with tracing.entry_span(f"webhook {source.name}", headers.get("traceparent"),
                                {"http.request.method": "POST",
                                 "http.route": "/webhooks/{source}"},
                                source=source.name, tenant=source.tenant,
                                events=len(events)) as span:
            answer = await _deliver(ctx, request.app.state.signer, source, events,
                                    span.traceparent)
            span.set(runs=len(answer["run_ids"]))
    except ClientDisconnect:
        return Response(status_code=400)
    except SignatureError as exc:
        log.warning("webhook %s: rejected (%s)", name, exc)
        return error_response(exc.status, "invalid_signature", str(exc))
    except DeliveryRejected as exc:
        return error_response(exc.status, exc.code, str(exc))
    except UnavailableError as exc:
        log.warning("webhook %s: answered 503 (%s)", name, exc)
        return _unavailable(f"{exc}; deliver again later")
    except PermanentError as exc:
        return error_response(422, "invalid_event", exc.reason)
    return JSONResponse(answer, status_code=202)


async def _deliver(ctx: IngressContext, signer: TenantSigner, source: WebhookSource,
                   events: list[TriggerEvent], traceparent: str | None = None,
                   ) -> dict[str, Any]:
    unique: dict[str, TriggerEvent] = {}
    for event in events:  # the same event twice in one delivery is one event
        unique.setdefault(event.event_id, event)
    keys = [_seen_key(ctx, source, e) for e in unique.values()]
    try:
        stored = await ctx.redis.mget(keys)
    except (RedisError, OSError) as exc:
        raise UnavailableError(f"Redis did not answer ({type(exc).__name__})") from exc
    rows: list[dict[str, Any]] = []
    fresh: list[tuple[str, TriggerEvent, dict[str, str]]] = []  # key, event, run id: workflow
    for key, event, seen in zip(keys, unique.values(), stored, strict=True):
        row: dict[str, Any] = {"event_id": event.event_id, "event_type": event.event_type}
        if seen is not None:
            row.update(status="duplicate", run_ids=json.loads(seen))
        else:
            try:
                runs = {run_id_for(event, wf.name): wf.name
                        for wf in ctx.workflows.starting(event)}
            except UnroutableEventError as exc:
                row.update(status="ignored", run_ids=[], reason=exc.reason)
            else:
                row.update(status="accepted", run_ids=list(runs))
                fresh.append((key, event, runs))
        rows.append(row)
    if fresh:
        await _publish(ctx, signer, source, [event for _, event, _ in fresh], traceparent)
        ttl, prefix = ctx.settings.idempotency_ttl_s, ctx.settings.topic_prefix
        try:
            async with ctx.redis.pipeline(transaction=False) as pipe:
                for key, _, runs in fresh:
                    pipe.set(key, json.dumps(list(runs)), nx=True, ex=ttl)
                await pipe.execute()
            for _, _, runs in fresh:  # for GET /runs/{id} (the run API)
                for run_id, workflow in runs.items():
                    await record_started(ctx.redis, prefix, run_id, source.tenant, workflow,
                                         ttl)
        except (RedisError, OSError) as exc:
            # published and acknowledged: the runs start; a redelivery is deduped downstream
            log.warning("webhook %s: events published but not remembered (%s)", source.name,
                        exc)
    return {"source": source.name, "tenant": source.tenant,
            "run_ids": [r for row in rows for r in row["run_ids"]], "events": rows}


async def _publish(ctx: IngressContext, signer: TenantSigner, source: WebhookSource,
                   events: list[TriggerEvent], traceparent: str | None = None) -> None:
    # marked as published for the authenticated tenant (agentfabric.tenancy): the router
    # trusts the signed af-tenant header, not the body; the trace goes on with the events
    trace = [(TRACE_HEADER, traceparent.encode())] if traceparent else []
    messages = [Outgoing.of(source.topic, e.event_id, e,
                            [*await signer.headers(source.tenant, e.event_id), *trace])
                for e in events]
    timeout = ctx.settings.ingress_send_timeout_s
    try:
        await asyncio.wait_for(ctx.producer.send_all(messages), timeout)
    except TimeoutError as exc:
        raise UnavailableError(f"the broker did not acknowledge the events within "
                               f"{timeout:g} s") from exc


def webhook_routes() -> list[Route]:
    return [Route("/webhooks/{source}", receive, methods=["POST"])]
