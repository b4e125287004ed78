"""The gateway's stages: small callables ``stage(state, call_next)``, each with one job.

:class:`~tools.gateway.pipeline.Gateway` chains them (its docstring draws the order). A stage
reads what it needs from the :class:`CallState`, calls ``call_next(state)`` (or not), and
raises errors of ``agentfabric.errors``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema
from pydantic import BaseModel, ValidationError

from agentfabric.errors import (
    AgentFabricError,
    ApprovalRequired,
    CircuitOpenError,
    ConfigError,
    ExpressionEvalError,
    RateLimitedError,
    ScopeError,
    ToolArgumentsError,
    ToolError,
    TransientError,
    UnavailableError,
)
from agents.expr import Expression, compile_expression
from agents.template import Template, compile_template
from schemas.serde import validation_reason
from tools.registry import ToolCall

from .breaker import Admission, Breakers
from .catalog import Catalog
from .http import HttpTools
from .identity import Claims, Identity
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter, limit_key
from .redact import json_result, redact, result_bytes, sanitize_error
from .spec import BreakerPolicy, ToolSpec

__all__ = [
    "ApprovalGrants",
    "CallState",
    "Compiled",
    "MemoryApprovalGrants",
    "Next",
    "Stage",
    "ToolTimeoutError",
    "chain",
    "compile_spec",
]

log = logging.getLogger(__name__)
ON_THE_FLY_TTL_S = 300.0


class ToolTimeoutError(TransientError):
    """One attempt of a tool call took longer than its timeout."""


class ApprovalGrants(Protocol):
    """Whether a person approved the call with this idempotency key."""

    async def granted(self, call_key: str) -> bool: ...


class MemoryApprovalGrants:
    """Grants held in memory (tests; and the default: nothing granted)."""

    def __init__(self, granted: Iterable[str] = ()) -> None:
        self.keys = set(granted)

    def grant(self, call_key: str) -> None:
        self.keys.add(call_key)

    async def granted(self, call_key: str) -> bool:
        return call_key in self.keys


@dataclass(frozen=True)
class Compiled:
    """What the stages prepare once per tool: its validator and approval condition."""

    validator: jsonschema.Draft202012Validator
    approval_when: Expression | None
    approval_reason: Template | None


def compile_spec(spec: ToolSpec) -> Compiled:
    try:
        jsonschema.Draft202012Validator.check_schema(spec.parameters)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"tool '{spec.name}' ({spec.source}): its parameters are not a "
                          f"valid JSON schema: {exc.message}") from exc
    validator = jsonschema.Draft202012Validator(
        spec.parameters, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    if spec.approval is None:
        return Compiled(validator, None, None)
    return Compiled(validator, compile_expression(spec.approval.when),
                    compile_template(spec.approval.reason))


@dataclass
class CallState:
    """One call on its way through the stages."""

    spec: ToolSpec
    arguments: dict[str, Any]
    call: ToolCall
    claims: Claims | None = None
    model_args: BaseModel | None = None
    attempts: int = 0
    degraded: str = ""
    timed_out: bool = False


Next = Callable[[CallState], Awaitable[Any]]


class Stage(Protocol):
    async def __call__(self, st: CallState, call_next: Next) -> Any: ...


def chain(stages: list[Stage], last: Next) -> Next:
    """``stages`` around ``last``, the first outermost."""
    call_next = last
    for stage in reversed(stages):
        call_next = _bind(stage, call_next)
    return call_next


def _bind(stage: Stage, call_next: Next) -> Next:
    async def run(st: CallState) -> Any:
        return await stage(st, call_next)

    return run


class Result:
    """The result as plain JSON, within ``max_result_bytes``, with ``redact`` paths masked."""

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        result = json_result(await call_next(st))
        size = result_bytes(result)
        if size > st.spec.max_result_bytes:
            raise ToolError(f"tool '{st.spec.name}' answered {size} bytes, more than its "
                            f"max_result_bytes ({st.spec.max_result_bytes}); ask for less or "
                            f"raise the tool's limit")
        return redact(result, st.spec.redact) if st.spec.redact else result


@dataclass
class VerifyIdentity:
    """The call's token verified into claims (minted on the fly only when allowed)."""

    identity: Identity
    require_token: bool = True

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        call, name = st.call, st.spec.name
        if call.token:
            claims = self.identity.verify(call.token)
            if call.agent and claims.agent != call.agent:
                raise ScopeError(f"the call says agent '{call.agent}', its token is agent "
                                 f"'{claims.agent}''s")
        elif not self.require_token and not call.agent:
            agent = f"{call.workflow}.{call.step}" if call.workflow and call.step \
                else "anonymous"
            fallback = st.spec.fallback.tool if st.spec.fallback is not None else None
            claims = self.identity.verify(self.identity.mint(
                agent, call.tenant, [name, *([fallback] if fallback else [])],
                ON_THE_FLY_TTL_S))
        else:
            raise ScopeError(f"tool '{name}' was called without an agent token (agent "
                             f"'{call.agent or '?'}'); the step worker mints one per step")
        st.claims = claims
        return await call_next(st)


class CheckScope:
    """The token names the tool, carries its scopes, and is for the call's tenant."""

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        claims, name, tenant = st.claims, st.spec.name, st.call.tenant
        assert claims is not None  # the identity stage ran
        if not claims.allows(name):
            raise ScopeError(f"agent '{claims.agent}' may not call tool '{name}': its token "
                             f"allows {', '.join(sorted(claims.tools)) or 'no tools'}; declare "
                             f"the tool in the step")
        missing = sorted(set(st.spec.scopes) - claims.scopes)
        if missing:
            raise ScopeError(f"agent '{claims.agent}' lacks the scope(s) {', '.join(missing)} "
                             f"that tool '{name}' requires")
        if claims.tenant != tenant:
            raise ScopeError(f"the token of agent '{claims.agent}' is for tenant "
                             f"'{claims.tenant}', the call for tenant '{tenant}'")
        return await call_next(st)


@dataclass
class ValidateArguments:
    """The arguments fit the tool's JSON schema (and its pydantic model, for Python tools)."""

    compiled: dict[str, Compiled]
    catalog: Catalog

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        name = st.spec.name
        errors = sorted(self.compiled[name].validator.iter_errors(st.arguments),
                        key=lambda e: (list(map(str, e.absolute_path)), e.message))
        if errors:
            problems = "; ".join(f"at {'.'.join(map(str, e.absolute_path)) or 'the top level'}: "
                                 f"{e.message}" for e in errors[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise ToolArgumentsError(sanitize_error(
                f"tool '{name}' rejected its arguments: {problems}{more}; fix the call", 600))
        if st.spec.http is None:
            model = self.catalog.python(name).args_model
            if model is not None:
                try:
                    st.model_args = model.model_validate(st.arguments)
                except ValidationError as exc:
                    raise ToolArgumentsError(sanitize_error(
                        f"tool '{name}' rejected its arguments: {validation_reason(exc)}; "
                        f"fix the call", 600)) from exc
        return await call_next(st)


@dataclass
class CheckApproval:
    """When the tool's approval condition holds, the call needs a person's grant."""

    compiled: dict[str, Compiled]
    grants: ApprovalGrants

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        policy, compiled = st.spec.approval, self.compiled[st.spec.name]
        if policy is None or compiled.approval_when is None:
            return await call_next(st)
        scope = {"args": st.arguments, "tenant": st.call.tenant, "tool": st.spec.name}
        note = ""
        try:
            needed = bool(compiled.approval_when.evaluate(scope))
        except ExpressionEvalError as exc:  # fail safe: a person decides
            needed, note = True, f" (its condition could not be evaluated: {exc.reason})"
        if needed and not await self.grants.granted(st.call.idempotency_key):
            reason = ""
            if compiled.approval_reason is not None:
                try:
                    reason = str(compiled.approval_reason.render(scope))
                except ExpressionEvalError:
                    reason = ""
            raise ApprovalRequired(sanitize_error((reason or f"{st.spec.name} needs approval")
                                                  + note),
                                   tool=st.spec.name, call_key=st.call.idempotency_key,
                                   expires_s=policy.expires_s)
        return await call_next(st)


@dataclass
class Fallback:
    """A call that still fails transiently (or finds its breaker open) is answered by the
    fallback tool (through ``fallback_chain``) or the fallback answer, noted as degraded."""

    catalog: Catalog
    fallback_chain: Callable[[], Next]

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        policy, name = st.spec.fallback, st.spec.name
        if policy is None:
            return await call_next(st)
        try:
            return await call_next(st)
        except UnavailableError:
            raise  # our own Redis or Kafka: the record is rewound, no fallback
        except TransientError as exc:
            why = _why(exc, st)
            if policy.tool is None:
                line = f"{name}: answered by its fallback answer ({why})"
                result = json_result(policy.answer)
            else:
                other = CallState(self.catalog.spec(policy.tool), st.arguments,
                                  dataclasses.replace(st.call, tool=policy.tool),
                                  claims=st.claims)
                try:
                    result = await self.fallback_chain()(other)
                except ApprovalRequired:
                    raise
                except AgentFabricError as failed:
                    raise TransientError(sanitize_error(
                        f"{exc.reason}; its fallback {policy.tool} failed too: "
                        f"{failed.reason}", 600)) from exc
                line = f"{name}: answered by fallback {policy.tool} ({why})"
            st.call.degraded.append(line)
            st.degraded = line
            return result


@dataclass
class Retry:
    """Transient failures tried again (jittered exponential backoff, ``Retry-After``
    honoured up to ``max_backoff_s``); the call, so its idempotency key, is the same."""

    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        policy = st.spec.retry
        for attempt in range(1, policy.attempts + 1):
            st.attempts = attempt
            try:
                return await call_next(st)
            except (RateLimitedError, CircuitOpenError, UnavailableError):
                raise  # waiting inside the call cannot help (or already happened)
            except TransientError as exc:
                if attempt >= policy.attempts:
                    raise
                delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1))
                delay = delay / 2 + self.jitter() * delay / 2
                wait = getattr(exc, "retry_after_s", None)
                if wait is not None:
                    if wait > policy.max_backoff_s:
                        raise  # longer than a call may wait: the step's retry tier waits
                    delay = max(delay, wait)
                log.debug("tool %s attempt %d failed (%s); again in %.2f s", st.spec.name,
                          attempt, exc.reason, delay)
                await self.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


@dataclass
class RateLimit:
    """A slot of the tool's shared rate limit for this tenant (waits up to max_wait_s)."""

    limiter: RateLimiter
    metrics: GatewayMetrics

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        policy = st.spec.rate_limit
        if policy is not None:
            try:
                await self.limiter.acquire(limit_key(st.spec.name, st.call.tenant), policy)
            except RateLimitedError:
                self.metrics.rate_limited(st.spec.name)
                raise
        return await call_next(st)


@dataclass
class Breaker:
    """The tool's shared breaker admits the attempt; only transient failures count."""

    breakers: Breakers
    metrics: GatewayMetrics

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        name, policy = st.spec.name, st.spec.breaker
        try:
            admission = await self.breakers.admit(name, policy)
        except CircuitOpenError:
            self.metrics.breaker_state(name, await self.breakers.state(name, policy))
            raise
        if admission.probe:
            self.metrics.breaker_state(name, "half_open")
        try:
            result = await call_next(st)
        except UnavailableError:
            raise
        except TransientError:
            await self.breakers.record(admission, policy, ok=False)
            self.metrics.breaker_state(name, await self.breakers.state(name, policy))
            raise
        except AgentFabricError:  # the tool answered: a refusal is an answer
            await self._ok(admission, policy)
            raise
        await self._ok(admission, policy)
        return result

    async def _ok(self, admission: Admission, policy: BreakerPolicy) -> None:
        await self.breakers.record(admission, policy, ok=True)
        if admission.probe or self.metrics.breaker_of(admission.tool) != "closed":
            self.metrics.breaker_state(admission.tool,
                                       await self.breakers.state(admission.tool, policy))


@dataclass
class Timeout:
    """One attempt within the tool's ``timeout_s`` (else ``default_s``); late is transient."""

    default_s: float

    async def __call__(self, st: CallState, call_next: Next) -> Any:
        limit = st.spec.timeout_s or self.default_s
        st.timed_out = False
        try:
            async with asyncio.timeout(limit) as deadline:
                return await call_next(st)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            st.timed_out = True
            raise ToolTimeoutError(f"tool '{st.spec.name}' did not answer within {limit:g} s "
                                   f"(attempt {st.attempts})") from exc


@dataclass
class Invoke:
    """The HTTP request, or the Python function (a sync one in a worker thread)."""

    catalog: Catalog
    http: HttpTools

    async def __call__(self, st: CallState) -> Any:
        spec = st.spec
        if spec.http is not None:
            return await self.http.call(spec, st.arguments, st.call)
        return await self.catalog.python(spec.name).run(spec.name, st.model_args,
                                                        st.arguments, st.call)


def _why(exc: TransientError, st: CallState) -> str:
    if isinstance(exc, CircuitOpenError):
        return "circuit open"
    if isinstance(exc, RateLimitedError):
        return "rate limited"
    what = "timed out" if isinstance(exc, ToolTimeoutError) else "failed"
    return f"{what} after {st.attempts} attempt{'s' if st.attempts != 1 else ''}"
