"""The rate limiter's logic on the in-memory limiter and a fake clock: a sliding log with
reservations, paced ``period / limit`` apart (at most ``limit`` per any window, waiting
exactly until the next free moment,
refusing at once when that is beyond ``max_wait_s``), and Redis errors translated. A moment
counts for ``window_s(policy)``: the period plus a guard of 2% (at most 50 ms)."""

from __future__ import annotations

import random

import pytest
from redis.asyncio import Redis

from agentfabric.errors import RateLimitedError, UnavailableError
from streams.embedded import free_port
from tools.gateway.ratelimit import (
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
    limit_key,
    spacing_s,
    window_s,
)
from tools.gateway.spec import RateLimitPolicy


class FakeClock:
    """A clock that only moves when told to or when someone sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock, sleep=clock.sleep)


def at_most_limit_per_window(moments: list[float], policy: RateLimitPolicy) -> bool:
    moments = sorted(moments)
    return all(sum(1 for m in moments if start <= m < start + policy.period_s) <= policy.limit
               for start in moments)


def test_memory_limiter_fits_the_protocol(limiter: MemoryRateLimiter) -> None:
    typed: RateLimiter = limiter
    assert typed is limiter
    assert limit_key("crm.lookup", "acme") == "crm.lookup:acme"


async def test_calls_are_paced_evenly_and_a_quiet_key_goes_at_once(
        limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    policy = RateLimitPolicy(limit=3, period_s=1)
    assert spacing_s(policy) == pytest.approx(1 / 3)
    assert [await limiter.acquire("k", policy) for _ in range(3)] == pytest.approx(
        [0.0, 1 / 3, 1 / 3])
    assert clock.slept == pytest.approx([1 / 3, 1 / 3])  # one sleep per call, no polling
    clock.now += 5
    assert await limiter.acquire("k", policy) == 0.0


async def test_a_call_over_the_limit_waits_until_the_oldest_leaves_the_window(
        limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    policy = RateLimitPolicy(limit=3, period_s=1, max_wait_s=5)
    for moment in (1000.0, 1000.34, 1000.68):  # further apart than the pacing (1/3 s)
        clock.now = moment
        assert await limiter.acquire("k", policy) == 0.0
    clock.now = 1000.7
    # the window is full until the call at 1000.0 leaves it, at 1001.0 + guard
    assert window_s(policy) == pytest.approx(1.02)
    assert await limiter.acquire("k", policy) == pytest.approx(0.32)
    assert clock.now == pytest.approx(1001.02)
    # the next frees when the call at 1000.34 leaves the window
    assert await limiter.acquire("k", policy) == pytest.approx(0.34)


async def test_no_slot_within_max_wait_fails_at_once_and_reserves_nothing(
        limiter: MemoryRateLimiter, clock: FakeClock) -> None:
    policy = RateLimitPolicy(limit=2, period_s=10, max_wait_s=1)
    await limiter.acquire("crm.lookup:acme", policy)
    clock.now += 5  # the pacing (10 s / 2)
    await limiter.acquire("crm.lookup:acme", policy)
    slept = list(clock.slept)
    with pytest.raises(RateLimitedError) as caught:
        await limiter.acquire("crm.lookup:acme", policy)
    assert clock.slept == slept
    reason = caught.value.reason
    assert "crm.lookup:acme" in reason
    assert "2/10s" in reason
    assert "5.05 s" in reason  # until the first call leaves: the period and the guard
    # the refused call took no slot: a patient caller gets the first free one
    patient = RateLimitPolicy(limit=2, period_s=10, max_wait_s=60)
    assert await limiter.acquire("crm.lookup:acme", patient) == pytest.approx(5.05)


async def test_max_wait_zero_refuses_as_soon_as_the_window_is_full(
        limiter: MemoryRateLimiter) -> None:
    policy = RateLimitPolicy(limit=1, period_s=1, max_wait_s=0)
    assert await limiter.acquire("k", policy) == 0.0
    with pytest.raises(RateLimitedError):
        await limiter.acquire("k", policy)


def test_waiting_callers_are_served_in_order_one_slot_each(
        limiter: MemoryRateLimiter) -> None:
    policy = RateLimitPolicy(limit=2, period_s=1, max_wait_s=5)
    waits = [limiter.reserve("k", policy) for _ in range(10)]
    # paced 0.5 s apart, and no window of the period holds more than two
    step = window_s(policy)
    assert [w for _, w in waits] == pytest.approx([i // 2 * step + i % 2 * 0.5
                                                   for i in range(10)])
    assert [ok for ok, _ in waits] == [True] * 10
    refused, wait = limiter.reserve("k", policy)
    assert not refused
    assert wait == pytest.approx(5 * step)


@pytest.mark.parametrize("max_wait_s", [0, 0.3, 2, 5])
def test_any_window_holds_at_most_limit_calls(limiter: MemoryRateLimiter, clock: FakeClock,
                                              max_wait_s: float) -> None:
    rng = random.Random(max_wait_s)
    policy = RateLimitPolicy(limit=7, period_s=1.5, max_wait_s=max_wait_s)
    moments = []
    for _ in range(400):
        clock.now += rng.expovariate(10)
        reserved, wait = limiter.reserve("k", policy)
        if reserved:
            moments.append(clock.now + wait)
    assert at_most_limit_per_window(moments, policy)
    # and callers who may wait use the limit: close to limit per window went through
    span = max(moments) - min(moments)
    if policy.max_wait_s >= window_s(policy):
        assert len(moments) >= 0.95 * policy.limit * span / window_s(policy)
    # even calls that leave up to the guard late keep to the limit
    late = [m + rng.uniform(0, window_s(policy) - policy.period_s) for m in moments]
    assert at_most_limit_per_window(late, policy)


async def test_keys_are_limited_separately(limiter: MemoryRateLimiter) -> None:
    policy = RateLimitPolicy(limit=1, period_s=60, max_wait_s=0)
    await limiter.acquire(limit_key("a", "t1"), policy)
    await limiter.acquire(limit_key("a", "t2"), policy)
    await limiter.acquire(limit_key("b", "t1"), policy)
    with pytest.raises(RateLimitedError):
        await limiter.acquire(limit_key("a", "t1"), policy)


def test_a_fractional_period_is_honoured(limiter: MemoryRateLimiter) -> None:
    policy = RateLimitPolicy(limit=10, period_s=0.5, max_wait_s=1)
    waits = [limiter.reserve("k", policy)[1] for _ in range(10)]
    assert waits == pytest.approx([i * 0.05 for i in range(10)])
    assert limiter.reserve("k", policy)[1] == pytest.approx(0.51)


async def test_a_redis_error_is_unavailable_with_a_reason() -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=2)
    try:
        with pytest.raises(UnavailableError) as caught:
            await RedisRateLimiter(client).acquire("crm.lookup:acme",
                                                   RateLimitPolicy(limit=1, period_s=1))
    finally:
        await client.aclose()
    assert "rate-limit slot of 'crm.lookup:acme'" in caught.value.reason
    assert caught.value.__cause__ is not None
