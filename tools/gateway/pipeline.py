"""The ``Gateway``: every tool call passes one chain of small stages, each with one job.

Outermost first; each stage calls the next, and the retry stage calls the ones after it
once per attempt (stages in :mod:`tools.gateway.stages`)::

    audit       one AuditEvent and the metrics per call, however it ended
    result      the result as plain JSON, size limit (max_result_bytes), redaction
    identity    the call's signed agent token verified (minted on the fly only in tests)
    scope       the token names this tool, carries its scopes, is for this tenant
    arguments   JSON-schema validation (Draft 2020-12): an invalid call reaches no system
    approval    when the tool's approval condition holds: a person's grant for this call
    fallback    a call that still fails transiently, or finds the breaker open: fallback
    retry       transient failures tried again, jittered exponential backoff, same key
    rate limit  a slot of the tool's shared limit for this tenant  }
    breaker     the tool's shared circuit breaker admits it         } once per attempt
    timeout     the tool's timeout_s (else the tool_timeout_s)     }
    invoke      the HTTP request or the Python function

Errors are those of ``agentfabric.errors``: ScopeError and ToolError (ToolArgumentsError)
are permanent; a timeout (:class:`ToolTimeoutError`), an unavailable service,
RateLimitedError and CircuitOpenError are transient; ApprovalRequired parks the run.
Every error text leaving the gateway is sanitized (:func:`sanitize_error`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentfabric import tracing
from agentfabric.errors import (
    AgentFabricError,
    ApprovalRequired,
    CircuitOpenError,
    RateLimitedError,
    ScopeError,
    ToolArgumentsError,
    ToolError,
    TransientError,
)
from tools.registry import ToolCall, ToolRegistry

from .audit import AuditEvent, AuditSink, KafkaAuditSink, LogAuditSink, Outcome, arguments_hash
from .breaker import Breakers, RedisBreakers
from .catalog import Catalog
from .http import HttpTools
from .identity import Claims, Identity
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter, RedisRateLimiter
from .redact import sanitize_error
from .spec import ToolSpec
from .stages import (
    ApprovalGrants,
    Breaker,
    CallState,
    CheckApproval,
    CheckScope,
    Fallback,
    Invoke,
    MemoryApprovalGrants,
    Next,
    RateLimit,
    Result,
    Retry,
    Stage,
    Timeout,
    ToolTimeoutError,
    ValidateArguments,
    VerifyIdentity,
    chain,
    compile_spec,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from redis.asyncio import Redis

    from agentfabric.settings import Settings
    from streams.kafka import Producer

__all__ = ["ApprovalGrants", "Gateway", "MemoryApprovalGrants", "ToolInfo", "ToolTimeoutError",
           "build_gateway", "load_catalog", "local_gateway", "redis_prefix", "sanitize_error"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolInfo:
    """What a model is shown of a tool."""

    name: str
    description: str
    parameters: dict[str, Any]


class Gateway:
    """The tool gateway; implements ``agents.recording.ToolCaller``.

    ``require_token=False`` lets a call that has neither a token nor an agent through with a
    token minted on the fly for just that tool (and its fallback): for tests and tools run
    by hand, never in production, where the engine mints one token per step."""

    owns_timeouts = True  # the engine need not bound calls: the timeout stage does

    def __init__(self, catalog: Catalog, identity: Identity, *, rate_limiter: RateLimiter,
                 breakers: Breakers, audit: AuditSink, metrics: GatewayMetrics | None = None,
                 grants: ApprovalGrants | None = None, http: HttpTools | None = None,
                 default_timeout_s: float = 30.0, require_token: bool = True,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 jitter: Callable[[], float] = random.random) -> None:
        self.catalog, self.identity, self.audit = catalog, identity, audit
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.http = http if http is not None else HttpTools({})
        self.require_token = require_token
        for spec in catalog.specs():
            self.http.check(spec)
        self._compiled = {spec.name: compile_spec(spec) for spec in catalog.specs()}
        self._default_timeout_s, self._sleep, self._jitter = default_timeout_s, sleep, jitter
        self.rate_limiter, self.breakers = rate_limiter, breakers
        self.grants: ApprovalGrants = grants if grants is not None else MemoryApprovalGrants()
        self._build()

    def _build(self) -> None:
        stages: list[Stage] = [
            self._audit, Result(), VerifyIdentity(self.identity, self.require_token),
            CheckScope(), ValidateArguments(self._compiled, self.catalog),
            CheckApproval(self._compiled, self.grants),
            Fallback(self.catalog, lambda: self._fallback_chain), Retry(self._sleep, self._jitter),
            RateLimit(self.rate_limiter, self.metrics), Breaker(self.breakers, self.metrics),
            Timeout(self._default_timeout_s)]
        invoke = Invoke(self.catalog, self.http)
        self._chain = chain(stages, invoke)
        # a fallback tool is allowed because the primary was; its own fallback is not followed
        skip = (VerifyIdentity, CheckScope, Fallback)
        self._fallback_chain = chain([s for s in stages if not isinstance(s, skip)], invoke)

    def connect(self, *, rate_limiter: RateLimiter | None = None,
                breakers: Breakers | None = None, audit: AuditSink | None = None,
                grants: ApprovalGrants | None = None) -> None:
        """Swap in the shared state a worker has once it is connected (Redis rate limits,
        breakers and approval grants; the Kafka audit sink). An engine built for a command
        that runs no tools keeps the in-process defaults."""
        self.rate_limiter = rate_limiter or self.rate_limiter
        self.breakers = breakers or self.breakers
        self.audit = audit or self.audit
        self.grants = grants or self.grants
        self._build()

    # ------------------------------------------------------------ ToolCaller

    def get(self, name: str) -> ToolInfo:
        spec = self.catalog.spec(name)
        return ToolInfo(spec.name, spec.description or spec.name, spec.parameters)

    def names(self) -> list[str]:
        return self.catalog.names()

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        """Run one tool call through every stage; returns the (redacted) JSON result."""
        if name not in self.catalog:
            reason = (f"no tool named '{name}' is declared; known tools: "
                      f"{', '.join(self.names()) or 'none'}")
            await self.refuse(name, arguments, call, reason)
            raise ToolError(reason)
        return await self._chain(CallState(self.catalog.spec(name), dict(arguments), call))

    async def refuse(self, name: str, arguments: Any, call: ToolCall, reason: str) -> None:
        """Audit a call refused before it reached the gateway (e.g. by the step)."""
        spec = self.catalog.spec(name) if name in self.catalog else None
        self._emit(name, call, arguments, "refused", reason, 0.0, spec=spec)

    def mint(self, call: ToolCall, tools: list[str], ttl_s: float = 900.0) -> str:
        """A token for the step of ``call`` (``workflow.step``), allowing ``tools``."""
        return self.identity.mint(call.agent or f"{call.workflow}.{call.step}", call.tenant,
                                  tools, ttl_s)

    def summary(self) -> list[str]:
        """One line per tool called: calls, failures, breaker state (for the demo)."""
        return self.metrics.summary()

    async def close(self) -> None:
        """Close the HTTP session and flush the audit sink."""
        await self.http.close()
        await self.audit.close()

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ audit

    async def _audit(self, st: CallState, call_next: Next) -> Any:
        started = time.monotonic()
        outcome: Outcome = "error"
        reason = "cancelled"
        # the call's span: tool, outcome, attempts; never the arguments or the result
        with tracing.span(f"tool {st.spec.name}", kind="client", tool=st.spec.name,
                          access=st.spec.access, run_id=st.call.run_id or None) as span:
            try:
                result = await call_next(st)
            except Exception as exc:
                outcome, reason = _outcome(exc, st)
                span.outcome(outcome, error=None if outcome == "approval_required"
                             else sanitize_error(reason))
                raise
            else:
                outcome, reason = ("fallback", st.degraded) if st.degraded else ("ok", "")
                span.outcome(outcome)
                return result
            finally:
                span.set(attempts=st.attempts)
                self._emit(st.spec.name, st.call, st.arguments, outcome, reason,
                           time.monotonic() - started, spec=st.spec, claims=st.claims,
                           attempts=st.attempts)

    def _emit(self, name: str, call: ToolCall, arguments: Any, outcome: Outcome, reason: str,
              seconds: float, *, spec: ToolSpec | None = None, claims: Claims | None = None,
              attempts: int = 0) -> None:
        agent = claims.agent if claims is not None else (call.agent or "anonymous")
        workflow, _, step = agent.partition(".")
        event = AuditEvent(
            agent=agent, tenant=call.tenant, run_id=call.run_id,
            workflow=call.workflow or (workflow if step else ""), step=call.step or step,
            tool=name, access=spec.access if spec is not None else None,
            arguments_hash=arguments_hash(arguments if isinstance(arguments, Mapping)
                                          else {"arguments": arguments}),
            outcome=outcome, reason=sanitize_error(reason), latency_ms=round(seconds * 1000, 3),
            attempts=attempts, idempotency_key=call.idempotency_key)
        self.metrics.observe(name, outcome, seconds)
        try:
            self.audit.emit(event)
        except AgentFabricError as exc:
            log.error("audit event of %s not emitted: %s", name, exc.reason)


def _outcome(exc: Exception, st: CallState) -> tuple[Outcome, str]:
    reason = exc.reason if isinstance(exc, AgentFabricError) else f"{type(exc).__name__}: {exc}"
    kinds: list[tuple[type[Exception], Outcome]] = [
        (ScopeError, "refused"), (ToolArgumentsError, "invalid_arguments"),
        (ApprovalRequired, "approval_required"), (RateLimitedError, "rate_limited"),
        (CircuitOpenError, "circuit_open"), (ToolTimeoutError, "timeout")]
    for kind, outcome in kinds:
        if isinstance(exc, kind):
            return outcome, reason
    if isinstance(exc, TransientError) and st.timed_out:  # its fallback failed after a timeout
        return "timeout", reason
    return "error", reason


def redis_prefix(settings: Settings, kind: str) -> str:
    """The Redis key prefix of the gateway's shared state: ``rl`` rate limits, ``cb``
    breakers (one namespace per topic prefix, like every key of the fabric)."""
    return f"{settings.topic_prefix}:gw:{kind}"


def load_catalog(settings: Settings, registry: ToolRegistry | None = None) -> Catalog:
    """The catalog of ``settings`` (shipped YAML, ``tools_dirs``, ``tool_modules``, entry
    points), plus the Python tools of ``registry`` (e.g. a test's or an embedding app's)."""
    catalog = Catalog.load(settings)
    if registry is not None:
        catalog.add_registry(registry)
    catalog.check()
    return catalog


def local_gateway(settings: Settings, catalog: Catalog) -> Gateway:
    """A gateway with in-process state (rate limits, breakers, grants) and audit events in
    the log: what an engine gets until a worker ``connect``s it to Redis and Kafka."""
    from .breaker import MemoryBreakers
    from .ratelimit import MemoryRateLimiter

    return Gateway(catalog, Identity.from_settings(settings, catalog),
                   rate_limiter=MemoryRateLimiter(), breakers=MemoryBreakers(),
                   audit=LogAuditSink(), http=HttpTools(settings.service_urls),
                   default_timeout_s=settings.tool_timeout_s)


def build_gateway(settings: Settings, redis: Redis, producer: Producer | None,
                  registry: ToolRegistry | None = None, *,
                  metrics_registry: CollectorRegistry | None = None,
                  grants: ApprovalGrants | None = None, catalog: Catalog | None = None,
                  require_token: bool = True) -> Gateway:
    """The production gateway: the catalog of ``settings`` (plus the Python tools of
    ``registry``, if given), rate limits
    and breakers in ``redis``, audit events on ``<prefix>.audit`` through ``producer`` (or
    the log, without one), tokens signed with ``gateway_secret``."""
    from streams.topics import TopicNames

    if catalog is None:
        catalog = load_catalog(settings, registry)
    audit: AuditSink = LogAuditSink() if producer is None else \
        KafkaAuditSink(producer, TopicNames(settings.topic_prefix).audit)
    return Gateway(catalog, Identity.from_settings(settings, catalog),
                   rate_limiter=RedisRateLimiter(redis, prefix=redis_prefix(settings, "rl")),
                   breakers=RedisBreakers(redis, prefix=redis_prefix(settings, "cb")),
                   audit=audit, metrics=GatewayMetrics(metrics_registry), grants=grants,
                   http=HttpTools(settings.service_urls),
                   default_timeout_s=settings.tool_timeout_s, require_token=require_token)
