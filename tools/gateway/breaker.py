"""Shared circuit breakers: one per tool, its state shared by every replica.

States (the semantics of :class:`~tools.gateway.spec.BreakerPolicy`)::

    closed     calls go through; ``failures`` transient failures within ``window_s`` open it
    open       no call goes through for ``open_s``; then the next admit finds it half-open
    half_open  at most ``half_open_probes`` calls (probes) at once, across all replicas;
               ``half_open_probes`` successes in a row close it, one failure opens it again

The gateway asks :meth:`Breakers.admit` before a call and reports the outcome with
:meth:`Breakers.record` (``ok=False`` only for transient failures). A probe holds a slot
until its outcome is recorded or the slot expires (``probe_ttl_s``, by default the policy's
``open_s``), so a probe whose process died does not wedge the breaker. Each admission
carries the breaker's *generation* (bumped whenever it opens or closes): an outcome from an
older generation is news about a state the breaker has left and is ignored.

In Redis, per tool: a hash ``<prefix>:<tool>`` (state, open-until, generation, successes,
why), a sorted set ``<prefix>:<tool>:f`` of failure moments and ``<prefix>:<tool>:p`` of
probe slots (score: when the slot expires), and the set ``<prefix>:_tools`` of tools with
state. Each decision is one Lua script on Redis's clock. ``docs/decisions/0010-...`` says
why this is not the ``purgatory`` library.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentfabric.errors import CircuitOpenError
from streams.batching import redis_unavailable

from .spec import BreakerPolicy

__all__ = ["Admission", "BreakerState", "Breakers", "MemoryBreakers", "RedisBreakers"]

BreakerState = Literal["closed", "open", "half_open"]
_US = 1_000_000


@dataclass(frozen=True)
class Admission:
    """Leave to call ``tool`` once: ``probe`` when the breaker is half-open (the call holds
    one of the probe slots); ``token`` names this call, ``generation`` the breaker's."""

    tool: str
    probe: bool
    token: str
    generation: int


class Breakers(Protocol):
    async def admit(self, tool: str, policy: BreakerPolicy) -> Admission:
        """Leave to call ``tool`` now; raises :class:`~agentfabric.errors.CircuitOpenError`
        (saying when to retry) while the breaker is open or its probe slots are taken."""

    async def record(self, admission: Admission, policy: BreakerPolicy, ok: bool) -> None:
        """The outcome of an admitted call (``ok=False`` only for transient failures)."""

    async def state(self, tool: str, policy: BreakerPolicy) -> BreakerState: ...

    async def states(self) -> dict[str, BreakerState]:
        """Every tool with state in the store (tools absent are closed)."""


def _opened(tool: str, why: str, wait_s: float) -> CircuitOpenError:
    return CircuitOpenError(
        f"the circuit breaker of tool '{tool}' is open ({why}); it lets a probe call "
        f"through in {max(wait_s, 0.0):.1f} s, so retry after that")


def _probing(tool: str, busy: int, wait_s: float) -> CircuitOpenError:
    return CircuitOpenError(
        f"the circuit breaker of tool '{tool}' is half-open and its {busy} probe call(s) "
        f"are still running; retry in a few seconds (a probe slot frees within "
        f"{max(wait_s, 0.0):.1f} s at the latest)")


def _why_failures(policy: BreakerPolicy) -> str:
    return f"{policy.failures} transient failure(s) within {policy.window_s:g} s"


_WHY_PROBE = "a half-open probe call failed"

# KEYS: hash, failures, probes. ARGV: max probes, probe ttl µs, token.
# Returns {kind, wait µs, generation, detail}: kind closed|probe|open|busy.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local st = redis.call('HGET', KEYS[1], 'st') or 'closed'
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if st == 'open' then
  local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if now < untl then
    return {'open', untl - now, gen, redis.call('HGET', KEYS[1], 'why') or ''}
  end
  st = 'half_open'
  redis.call('HSET', KEYS[1], 'st', st, 'ok', 0)
  redis.call('DEL', KEYS[3])
end
if st == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', string.format('%d', now))
  local busy = redis.call('ZCARD', KEYS[3])
  if busy >= tonumber(ARGV[1]) then
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {'busy', tonumber(first[2]) - now, gen, tostring(busy)}
  end
  local ttl = tonumber(ARGV[2])
  redis.call('ZADD', KEYS[3], string.format('%d', now + ttl), ARGV[3])
  redis.call('PEXPIRE', KEYS[3], math.ceil(ttl / 1000) + 1000)
  return {'probe', 0, gen, ''}
end
return {'closed', 0, gen, ''}
"""

# KEYS: hash, failures, probes, registry. ARGV: ok 1|0, probe 1|0, generation, token,
# probe successes that close it, window µs, open µs, tool, failures that open it, why
# (when failures open it). Returns the state after.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('SADD', KEYS[4], ARGV[8])
local st = redis.call('HGET', KEYS[1], 'st') or 'closed'
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if tonumber(ARGV[3]) ~= gen then return st end
local function open(why)
  redis.call('HSET', KEYS[1], 'st', 'open', 'gen', gen + 1, 'ok', 0, 'why', why,
             'until', string.format('%d', now + tonumber(ARGV[7])))
  redis.call('DEL', KEYS[2], KEYS[3])
  return 'open'
end
if ARGV[2] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[4])
  if st ~= 'half_open' then return st end
  if ARGV[1] ~= '1' then return open('__probe__') end
  if redis.call('HINCRBY', KEYS[1], 'ok', 1) >= tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[1], 'st', 'closed', 'gen', gen + 1, 'ok', 0, 'why', '')
    redis.call('DEL', KEYS[2], KEYS[3])
    return 'closed'
  end
  return st
end
if ARGV[1] == '1' or st ~= 'closed' then return st end
local window = tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], string.format('%d', now), ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%d', now - window))
redis.call('PEXPIRE', KEYS[2], math.ceil(window / 1000) + 1000)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[9]) then return open(ARGV[10]) end
redis.call('HSETNX', KEYS[1], 'st', 'closed')
return st
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBreakers:
    """Breakers in Redis, shared by every replica (see the module docstring for the keys)."""

    def __init__(self, redis: Redis, prefix: str = "af:gw:cb",
                 probe_ttl_s: float | None = None) -> None:
        self._redis, self._prefix, self._probe_ttl_s = redis, prefix, probe_ttl_s
        self._registry = f"{prefix}:_tools"  # tool names start with a letter: no clash
        self._admit = redis.register_script(_ADMIT)
        self._record = redis.register_script(_RECORD)

    def _keys(self, tool: str) -> list[str]:
        base = f"{self._prefix}:{tool}"  # tool names have no ':' (TOOL_NAME_PATTERN)
        return [base, f"{base}:f", f"{base}:p", self._registry]

    async def admit(self, tool: str, policy: BreakerPolicy) -> Admission:
        ttl_s = self._probe_ttl_s or policy.open_s
        token = uuid.uuid4().hex
        try:
            kind, wait_us, gen, detail = await self._admit(
                keys=self._keys(tool)[:3],
                args=[policy.half_open_probes, round(ttl_s * _US), token])
        except RedisError as exc:
            raise redis_unavailable(exc, doing=f"the circuit breaker of '{tool}'") from exc
        kind, wait_s = _text(kind), int(wait_us) / _US
        if kind == "open":
            why = _text(detail)
            raise _opened(tool, _WHY_PROBE if why == "__probe__" else why, wait_s)
        if kind == "busy":
            raise _probing(tool, int(_text(detail)), wait_s)
        return Admission(tool, kind == "probe", token, int(gen))

    async def record(self, admission: Admission, policy: BreakerPolicy, ok: bool) -> None:
        try:
            await self._record(
                keys=self._keys(admission.tool),
                args=[int(ok), int(admission.probe), admission.generation, admission.token,
                      policy.half_open_probes, round(policy.window_s * _US),
                      round(policy.open_s * _US), admission.tool, policy.failures,
                      _why_failures(policy)])
        except RedisError as exc:
            raise redis_unavailable(exc, doing=f"the circuit breaker of "
                                               f"'{admission.tool}'") from exc

    async def state(self, tool: str, policy: BreakerPolicy) -> BreakerState:
        return (await self._states([tool]))[tool]

    async def states(self) -> dict[str, BreakerState]:
        try:
            tools = sorted(_text(t) for t in await self._redis.smembers(self._registry))
        except RedisError as exc:
            raise redis_unavailable(exc, doing="reading the circuit breakers") from exc
        return await self._states(tools)

    async def _states(self, tools: list[str]) -> dict[str, BreakerState]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.time()
                for tool in tools:
                    pipe.hmget(self._keys(tool)[0], ["st", "until"])
                (secs, micros), *rows = await pipe.execute()
        except RedisError as exc:
            raise redis_unavailable(exc, doing="reading the circuit breakers") from exc
        now = int(secs) * _US + int(micros)
        out: dict[str, BreakerState] = {}
        for tool, (st, until) in zip(tools, rows, strict=True):
            name = _text(st) if st is not None else "closed"
            if name == "open" and until is not None and now >= int(_text(until)):
                name = "half_open"
            out[tool] = cast(BreakerState, name)
        return out


@dataclass
class _Breaker:
    state: BreakerState = "closed"
    until: float = 0.0
    generation: int = 0
    successes: int = 0
    why: str = ""
    failures: list[float] = field(default_factory=list)
    probes: dict[str, float] = field(default_factory=dict)  # token -> slot expiry


class MemoryBreakers:
    """The same breakers in one process (for unit tests); ``clock`` can be a fake."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 probe_ttl_s: float | None = None) -> None:
        self._clock, self._probe_ttl_s = clock, probe_ttl_s
        self._breakers: dict[str, _Breaker] = {}
        self._recorded: set[str] = set()  # the tools with state, as in Redis

    def _current(self, tool: str, now: float) -> _Breaker:
        b = self._breakers.setdefault(tool, _Breaker())
        if b.state == "open" and now >= b.until:
            b.state, b.successes, b.probes = "half_open", 0, {}
        return b

    async def admit(self, tool: str, policy: BreakerPolicy) -> Admission:
        now = self._clock()
        b = self._current(tool, now)
        if b.state == "open":
            raise _opened(tool, b.why, b.until - now)
        token = uuid.uuid4().hex
        if b.state == "closed":
            return Admission(tool, False, token, b.generation)
        b.probes = {k: exp for k, exp in b.probes.items() if exp > now}
        if len(b.probes) >= policy.half_open_probes:
            raise _probing(tool, len(b.probes), min(b.probes.values()) - now)
        b.probes[token] = now + (self._probe_ttl_s or policy.open_s)
        return Admission(tool, True, token, b.generation)

    async def record(self, admission: Admission, policy: BreakerPolicy, ok: bool) -> None:
        now = self._clock()
        self._recorded.add(admission.tool)
        b = self._breakers.setdefault(admission.tool, _Breaker())
        if admission.generation != b.generation:
            return
        if admission.probe:
            b.probes.pop(admission.token, None)
            if b.state != "half_open":
                return
            if not ok:
                self._open(b, now, policy, _WHY_PROBE)
                return
            b.successes += 1
            if b.successes >= policy.half_open_probes:
                b.state, b.generation, b.successes, b.why = "closed", b.generation + 1, 0, ""
                b.failures, b.probes = [], {}
            return
        if ok or b.state != "closed":
            return
        b.failures = [at for at in b.failures if at > now - policy.window_s] + [now]
        if len(b.failures) >= policy.failures:
            self._open(b, now, policy, _why_failures(policy))

    @staticmethod
    def _open(b: _Breaker, now: float, policy: BreakerPolicy, why: str) -> None:
        b.state, b.until, b.generation, b.successes, b.why = (
            "open", now + policy.open_s, b.generation + 1, 0, why)
        b.failures, b.probes = [], {}

    async def state(self, tool: str, policy: BreakerPolicy) -> BreakerState:
        return self._current(tool, self._clock()).state

    async def states(self) -> dict[str, BreakerState]:
        now = self._clock()
        return {tool: self._current(tool, now).state for tool in sorted(self._recorded)}
