"""Traces: W3C trace context helpers, and OpenTelemetry spans exported over OTLP when
``AGENTFABRIC_OTLP_ENDPOINT`` is set (the ``otel`` extra). Off by default.

Nothing here imports OpenTelemetry until :func:`start` finds an endpoint configured; until
then every span function yields one shared no-op handle, so the core install pays nothing.

The spans (docs/operations.md, "Traces")::

    POST /runs, webhook <source>, publish <source>   the request or call that sent a run in
    └── route <source>                                the router starting the event's runs
        └── step <workflow>.<step>                    one attempt of one step
            ├── chat <model>                          one model request (tokens, no prompt)
            ├── tool <name>                           one tool call (outcome, no arguments)
            └── step <workflow>.<next step>           the next step: a child of this one

A step span's id is not random: it derives from the step visit's idempotency key and
attempt (:func:`step_span_id`), so the engine, a pure function of the message, names it
as the parent in the traceparent of every message the step emits, and the next step's span
(another process, later) becomes its child; redelivered or replayed records emit the same
bytes. See docs/decisions/0013-tracing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .errors import ConfigError
from .redaction import redact

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from schemas.models import StepMessage

    from .settings import Settings

__all__ = ["NO_SPAN", "OTEL_EXTRA", "SpanHandle", "TraceParent", "current_traceparent",
           "enabled", "entry_span", "linked_span", "parse_traceparent", "span", "span_id_for",
           "start", "step_span", "step_span_id", "stop"]

log = logging.getLogger(__name__)

OTEL_EXTRA = "`pip install 'agentfabric[otel]'`"
Kind = Literal["internal", "server", "client", "producer", "consumer"]
Attribute = str | int | float | bool | None

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class TraceParent(NamedTuple):
    """A parsed W3C ``traceparent``: trace id, parent span id, flags (hex)."""

    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The trace context of a ``traceparent`` value, or None if it is absent or invalid
    (W3C: lower-case hex, version not ``ff``, neither id all zeros)."""
    match = _TRACEPARENT.match((value or "").strip())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceParent(trace_id, span_id, flags)


def span_id_for(basis: str) -> str:
    """A span id (16 hex digits) derived from ``basis``."""
    digest = hashlib.sha256(basis.encode()).hexdigest()
    return digest[:16] if digest[:16] != "0" * 16 else digest[16:32]


def step_span_id(idempotency_key: str, attempt: int = 1) -> str:
    """The span id of one attempt of one step visit (its idempotency key): the parent span
    named by the traceparent of every message that attempt emits."""
    return span_id_for(idempotency_key if attempt <= 1 else f"{idempotency_key}#{attempt}")


class SpanHandle:
    """What a ``with`` block gets: attributes and the outcome to add, and the span's own
    ``traceparent`` (None when tracing is off) to send on."""

    traceparent: str | None = None

    def set(self, attributes: Mapping[str, Attribute] | None = None, /,
            **more: Attribute) -> None:
        """Add attributes (names without a dot get the ``agentfabric.`` namespace; None
        values are left out)."""

    def outcome(self, outcome: str, *, error: str | None = None) -> None:
        """How the work ended; with ``error`` (a short, secret-free reason) the span's
        status is ERROR."""


NO_SPAN = SpanHandle()  # the one handle every span function yields while tracing is off


@dataclass
class _State:
    provider: Any  # opentelemetry.sdk.trace.TracerProvider
    tracer: Any
    users: int = 1


_state: _State | None = None
# span and trace ids the next span started must take (deterministic step span ids)
_forced: contextvars.ContextVar[tuple[int | None, int | None]] = contextvars.ContextVar(
    "agentfabric_forced_ids", default=(None, None))


def enabled() -> bool:
    """Whether spans are recorded in this process now."""
    return _state is not None


def _endpoint(base: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (``.../v1/traces`` as given)."""
    base = base.rstrip("/")
    return base if base.endswith("/v1/traces") else f"{base}/v1/traces"


def traces_url(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """Where spans go: ``AGENTFABRIC_OTLP_ENDPOINT`` (a collector's base URL), else the
    standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the traces URL itself) or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL), unless ``OTEL_SDK_DISABLED=true`` or
    ``OTEL_TRACES_EXPORTER=none``; None: no spans."""
    env = os.environ if env is None else env
    if settings.otlp_endpoint is not None:
        return _endpoint(settings.otlp_endpoint)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or \
            env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return url
    if url := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return _endpoint(url)
    return None


def start(settings: Settings, exporter: SpanExporter | None = None) -> bool:
    """Record and export spans if an OTLP endpoint is configured (:func:`traces_url`; or,
    in tests, to ``exporter``); returns whether tracing is on. Each call that returns True
    needs one :func:`stop`. ``AGENTFABRIC_OTLP_ENDPOINT`` without OpenTelemetry installed
    raises ``ConfigError`` naming the extra; the standard ``OTEL_*`` variables (maybe set
    for other programs) only log a warning then."""
    global _state
    url = traces_url(settings) if exporter is None else None
    if url is None and exporter is None:
        return False
    if _state is not None:
        _state.users += 1
        return True
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
    except ImportError as exc:
        if settings.otlp_endpoint is None and exporter is None:
            log.warning("an OTEL_EXPORTER_OTLP_* endpoint is set, but OpenTelemetry is not "
                        "installed (%s): no spans", OTEL_EXTRA)
            return False
        raise ConfigError(f"AGENTFABRIC_OTLP_ENDPOINT is set, but OpenTelemetry is not "
                          f"installed: {OTEL_EXTRA}, or unset the endpoint") from exc
    named = ("OTEL_SERVICE_NAME" in os.environ
             and "service_name" not in settings.model_fields_set)
    resource = Resource.create({} if named else {"service.name": settings.service_name})
    provider = TracerProvider(resource=resource, id_generator=_ids())
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        assert url is not None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        log.info("traces exported to %s", redact(url))
    _state = _State(provider, provider.get_tracer("agentfabric"))
    return True


async def stop() -> None:
    """Release one :func:`start`; the last flushes the spans not yet exported and shuts the
    exporter down (in a thread: an unreachable collector does not block the loop)."""
    global _state
    state = _state
    if state is None:
        return
    state.users -= 1
    if state.users > 0:
        return
    _state = None
    await asyncio.to_thread(state.provider.shutdown)


def _ids() -> Any:
    """The SDK's random id generator, except for ids forced through ``_forced``."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class ForcedIds(RandomIdGenerator):
        def generate_span_id(self) -> int:
            forced = _forced.get()[0]
            return forced if forced is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced.get()[1]
            return forced if forced is not None else super().generate_trace_id()

    return ForcedIds()


class _Live(SpanHandle):
    def __init__(self, otel_span: Any) -> None:
        self.span = otel_span
        self.settled = False
        ctx = otel_span.get_span_context()
        self.traceparent = (f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-"
                            f"{int(ctx.trace_flags):02x}")

    def set(self, attributes: Mapping[str, Attribute] | None = None, /,
            **more: Attribute) -> None:
        for name, value in {**(attributes or {}), **more}.items():
            if value is not None:
                self.span.set_attribute(name if "." in name else f"agentfabric.{name}", value)

    def outcome(self, outcome: str, *, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.settled = True
        self.span.set_attribute("agentfabric.outcome", outcome)
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, redact(error)[:300]))


def _kind(kind: Kind) -> Any:
    from opentelemetry.trace import SpanKind

    return getattr(SpanKind, kind.upper())


@contextlib.contextmanager
def _run(state: _State, name: str, context: Any, kind: Kind,
         attributes: Mapping[str, Attribute], span_id: str | None = None,
         trace_id: str | None = None) -> Iterator[SpanHandle]:
    from opentelemetry import trace

    token = _forced.set((int(span_id, 16) if span_id else None,
                         int(trace_id, 16) if trace_id else None))
    try:
        otel_span = state.tracer.start_span(name, context=context, kind=_kind(kind))
    finally:
        _forced.reset(token)
    handle = _Live(otel_span)
    handle.set(attributes)
    with trace.use_span(otel_span, end_on_exit=True, record_exception=False,
                        set_status_on_exception=False):
        try:
            yield handle
        except BaseException as exc:
            if not handle.settled:
                reason = getattr(exc, "reason", None)
                handle.set({"error.type": type(exc).__name__})
                handle.outcome("error", error=f"{type(exc).__name__}: "
                                              f"{reason if isinstance(reason, str) else exc}")
            raise


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Attribute] | None = None, /, *,
         kind: Kind = "internal", **more: Attribute) -> Iterator[SpanHandle]:
    """A span that is a child of the current one (a model or tool call, a publish)."""
    state = _state
    if state is None:
        yield NO_SPAN
        return
    with _run(state, name, None, kind, {**(attributes or {}), **more}) as handle:
        yield handle


@contextlib.contextmanager
def linked_span(name: str, parent: TraceParent | None,
                attributes: Mapping[str, Attribute] | None = None, /, *,
                kind: Kind = "consumer", span_id: str | None = None,
                trace_id: str | None = None, **more: Attribute) -> Iterator[SpanHandle]:
    """A span whose parent came from another process (``parent``, from a record or a
    request), or a root span (``parent`` None) in trace ``trace_id`` (default: a new one);
    ``span_id`` gives the span the id messages already name."""
    state = _state
    if state is None:
        yield NO_SPAN
        return
    from opentelemetry import trace
    from opentelemetry.context import Context

    context: Any = Context()  # not a child of whatever is current
    if parent is not None:
        remote = trace.SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16),
                                   is_remote=True, trace_flags=trace.TraceFlags(
                                       int(parent.flags, 16)))
        context = trace.set_span_in_context(trace.NonRecordingSpan(remote), context)
    with _run(state, name, context, kind, {**(attributes or {}), **more}, span_id,
              None if parent is not None else trace_id) as handle:
        yield handle


@contextlib.contextmanager
def entry_span(name: str, incoming: str | None,
               attributes: Mapping[str, Attribute] | None = None, /, *,
               kind: Kind = "server", **more: Attribute) -> Iterator[SpanHandle]:
    """The span of a request or call that sends work in (an ingress request, a publish): a
    child of the caller's ``incoming`` traceparent if valid, else of the current span (or a
    root). Its ``traceparent`` is what to send on: the span's own, or, with tracing off,
    the caller's (None without one)."""
    parent = parse_traceparent(incoming)
    if _state is None:
        handle = SpanHandle()
        handle.traceparent = parent.header if parent is not None else None
        yield handle
        return
    if parent is not None:
        with linked_span(name, parent, {**(attributes or {}), **more}, kind=kind) as live:
            yield live
    else:
        with span(name, {**(attributes or {}), **more}, kind=kind) as live:
            yield live


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to send on an outgoing request (None when
    tracing is off or no span is current)."""
    if _state is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def step_span(name: str, message: StepMessage,
              lineage: str = "") -> contextlib.AbstractContextManager[SpanHandle]:
    """The span of one attempt of one step (``name``: ``workflow.step``): a child of the span
    the message's traceparent names, with the id the messages it emits name as their parent
    (``lineage``, a replay or an approval running the step again, gets an id of its own).
    A message that names its own first attempt's span started a run without a trace: root."""
    if _state is None:
        return contextlib.nullcontext(NO_SPAN)
    key, attempt = message.idempotency_key, message.attempt
    own = span_id_for(f"{key}#{attempt}:{lineage}") if lineage else step_span_id(key, attempt)
    parent = parse_traceparent(message.trace_parent)
    trace_id = parent.trace_id if parent is not None else _run_trace_id(message.run_id)
    if parent is not None and parent.span_id == step_span_id(key):
        parent = None
    return linked_span(f"step {name}", parent, {"messaging.system": "kafka"},
                       kind="consumer", span_id=own, trace_id=trace_id,
                       workflow=message.workflow, workflow_version=message.workflow_version,
                       step=message.step, run_id=message.run_id, tenant=message.tenant,
                       attempt=attempt, idempotency_key=key, lineage=lineage or None)


def _run_trace_id(run_id: str) -> str:
    """The trace id of a run sent in without a trace (as ``agents.engine`` derives it)."""
    try:
        return uuid.UUID(run_id).hex
    except ValueError:
        return hashlib.sha256(run_id.encode()).hexdigest()[:32]
