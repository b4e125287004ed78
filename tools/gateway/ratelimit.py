"""Shared rate limits: at most ``limit`` calls per ``period_s`` per key (a tool and a tenant),
across every replica.

The algorithm is an exact sliding log with reservations. Per key the store keeps the
moments at which calls were let through, newest last. A call that finds fewer than
``limit`` moments within the last ``period_s`` goes now; otherwise its moment is the
``limit``-th newest one plus ``period_s`` (the first moment at which the window has room),
and it is *reserved* there, so the caller sleeps exactly until then and goes, without
asking again. Reserved moments only grow, so any window of ``period_s`` holds at most
``limit`` of them. A call whose moment is further away than ``policy.max_wait_s`` reserves
nothing and fails at once with :class:`~agentfabric.errors.RateLimitedError` (waiting could
not help: every earlier moment is taken).

Hence no polling: one atomic round trip per call (a Lua script, on Redis's own clock, so the
replicas' clocks do not matter), and waiting callers of all processes are served in the
order they asked. A reservation whose caller is cancelled or dies is not given back (the
limit errs on the safe side).

A call leaves its caller a little after its moment (the reply's way back, the event loop's
lag), and by different amounts for different calls, so what the service sees is the moments
plus a jitter. Two rules keep that jitter from adding up: moments are *paced*, at least
``period_s / limit`` apart (:func:`spacing_s`; a window's calls are spread over it, not
sent in one burst that a late burst could overlap), so a jitter of one spacing adds at most
one call to any window the service measures; and a moment stays in the log a *guard*
longer than ``period_s`` (:func:`window_s`: 2% of the period, at most 50 ms), which costs
at most 2% of the rate. ``docs/decisions/0010-gateway-rate-limits-and-breakers.md``
says why this is not the ``limits`` library.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentfabric.errors import RateLimitedError
from streams.batching import redis_unavailable

from .spec import RateLimitPolicy

__all__ = ["MemoryRateLimiter", "RateLimiter", "RedisRateLimiter", "limit_key", "spacing_s",
           "window_s"]

_US = 1_000_000
GUARD_FRACTION = 0.02
MAX_GUARD_S = 0.05


def window_s(policy: RateLimitPolicy) -> float:
    """How long a call's moment counts against the limit: ``period_s`` plus the guard."""
    return policy.period_s + min(policy.period_s * GUARD_FRACTION, MAX_GUARD_S)


def spacing_s(policy: RateLimitPolicy) -> float:
    """The least time between two calls of one key: ``period_s / limit`` (calls are paced
    evenly, not let through in bursts of a whole window)."""
    return policy.period_s / policy.limit


def limit_key(tool: str, tenant: str) -> str:
    """The key of one tool's limit for one tenant."""
    return f"{tool}:{tenant}"


class RateLimiter(Protocol):
    async def acquire(self, key: str, policy: RateLimitPolicy) -> float:
        """Wait for a slot (up to ``policy.max_wait_s``); return the seconds waited; raise
        :class:`~agentfabric.errors.RateLimitedError` when no slot is free in time."""


def _refused(key: str, policy: RateLimitPolicy, wait_s: float) -> RateLimitedError:
    return RateLimitedError(
        f"the rate limit {policy.text} of '{key}' has no free slot for {wait_s:.2f} s, "
        f"longer than the {policy.max_wait_s:g} s a call may wait; retry later or raise "
        f"the tool's rate_limit")


# KEYS[1]: the key's log, a sorted set of moments (µs on Redis's clock).
# ARGV: limit, window µs (period + guard), max wait µs, a unique member, spacing µs.
# Returns {granted 0|1, wait µs}.
_RESERVE = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
local at = now
if n >= limit then
  local kth = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  at = math.max(now, tonumber(kth[2]) + window)
end
if n > 0 then
  local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  at = math.max(at, tonumber(newest[2]) + tonumber(ARGV[5]))
end
if at - now > tonumber(ARGV[3]) then return {0, at - now} end
redis.call('ZADD', KEYS[1], string.format('%d', at), ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil((at - now + window) / 1000) + 1000)
return {1, at - now}
"""


class RedisRateLimiter:
    """Rate limits in Redis, shared by every replica: one sorted set per key
    (``<prefix>:<key>``), one script call per :meth:`acquire`."""

    def __init__(self, redis: Redis, prefix: str = "af:gw:rl",
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._prefix = prefix
        self._reserve = redis.register_script(_RESERVE)
        self._sleep = sleep

    async def acquire(self, key: str, policy: RateLimitPolicy) -> float:
        try:
            granted, wait_us = await self._reserve(
                keys=[f"{self._prefix}:{key}"],
                args=[policy.limit, round(window_s(policy) * _US),
                      round(policy.max_wait_s * _US), uuid.uuid4().hex,
                      round(spacing_s(policy) * _US)])
        except RedisError as exc:
            raise redis_unavailable(exc, doing=f"taking a rate-limit slot of '{key}'") from exc
        wait_s = int(wait_us) / _US
        if not int(granted):
            raise _refused(key, policy, wait_s)
        if wait_s > 0:
            await self._sleep(wait_s)
        return wait_s


class MemoryRateLimiter:
    """The same limits in one process (for unit tests): ``clock`` and ``sleep`` can be fakes
    (a fake ``sleep`` should advance the fake clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._logs: dict[str, deque[float]] = {}

    def reserve(self, key: str, policy: RateLimitPolicy) -> tuple[bool, float]:
        """(reserved, seconds until the slot): the slot is reserved unless it is further
        away than ``policy.max_wait_s``."""
        now, window = self._clock(), window_s(policy)
        log = self._logs.setdefault(key, deque())
        while log and log[0] <= now - window:
            log.popleft()
        at = now
        if len(log) >= policy.limit:
            at = max(now, log[len(log) - policy.limit] + window)
        if log:
            at = max(at, log[-1] + spacing_s(policy))
        if at - now > policy.max_wait_s:
            return False, at - now
        log.append(at)
        return True, at - now

    async def acquire(self, key: str, policy: RateLimitPolicy) -> float:
        reserved, wait_s = self.reserve(key, policy)
        if not reserved:
            raise _refused(key, policy, wait_s)
        if wait_s > 0:
            await self._sleep(wait_s)
        return wait_s
