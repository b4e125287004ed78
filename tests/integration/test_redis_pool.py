"""Every process opens Redis on a pool that waits for a free connection: a burst of
commands larger than the pool queues instead of failing, and only a wait past
``redis_pool_wait_s`` fails, as Redis being unavailable with a reason that says so."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from agentfabric.errors import UnavailableError
from agentfabric.settings import Settings
from streams.batching import redis_unavailable
from streams.redispool import open_redis
from tools.gateway.ratelimit import RedisRateLimiter
from tools.gateway.spec import RateLimitPolicy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# a burst of BLPOPs that each hold a connection for HOLD_S, on a pool of POOL connections
BURST, HOLD_S, POOL = 24, 0.1, 4


async def test_a_burst_larger_than_the_pool_queues_and_completes(settings: Settings) -> None:
    small = settings.model_copy(update={"redis_max_connections": POOL})
    redis = open_redis(small)
    key = f"{settings.topic_prefix}:empty"
    try:
        started = time.monotonic()
        # 24 BLPOPs on 4 connections take 6 turns of 0.1 s
        replies = await asyncio.gather(*(redis.blpop([key], timeout=HOLD_S)
                                         for _ in range(BURST)))
        took = time.monotonic() - started
        assert replies == [None] * BURST
        assert took >= 0.5, f"{took:.2f}s: more than {POOL} connections were open at once"
    finally:
        await redis.aclose()


async def test_the_plain_pool_would_have_failed_the_same_burst(settings: Settings) -> None:
    """Why the fabric does not use redis-py's default pool: it raises at once."""
    plain = Redis.from_url(settings.redis_url, max_connections=POOL)
    key = f"{settings.topic_prefix}:empty"
    try:
        replies = await asyncio.gather(*(plain.blpop([key], timeout=HOLD_S)
                                         for _ in range(BURST)), return_exceptions=True)
        refused = [r for r in replies if isinstance(r, RedisConnectionError)]
        assert len(refused) == BURST - POOL == 20, replies
    finally:
        await plain.aclose()


async def test_a_burst_of_rate_limit_slots_with_the_default_pool(settings: Settings) -> None:
    """Five hundred tool calls taking a rate-limit slot at once (a worker's records in flight
    across its consumers): none fails for want of a connection."""
    redis = open_redis(settings)
    limiter = RedisRateLimiter(redis, prefix=f"{settings.topic_prefix}:gw:rl")
    policy = RateLimitPolicy(limit=10_000, period_s=1, max_wait_s=5)
    try:
        waits = await asyncio.gather(*(limiter.acquire("crm", policy) for _ in range(500)))
        assert len(waits) == 500
    finally:
        await redis.aclose()


async def test_a_wait_past_the_bound_is_redis_unavailable(settings: Settings) -> None:
    one = settings.model_copy(update={"redis_max_connections": 1, "redis_pool_wait_s": 0.2})
    redis = open_redis(one)
    key = f"{settings.topic_prefix}:empty"
    try:
        holder = asyncio.create_task(redis.blpop([key], timeout=2))
        await asyncio.sleep(0.1)  # the only connection is now held
        started = time.monotonic()
        with pytest.raises(RedisConnectionError) as caught:
            await redis.get(key)
        assert time.monotonic() - started < 1.5
        reason = redis_unavailable(caught.value, doing="a test")
        assert isinstance(reason, UnavailableError)
        assert "AGENTFABRIC_REDIS_MAX_CONNECTIONS" in str(reason)
        assert await holder is None
        assert await redis.get(key) is None  # the pool serves again once it is free
    finally:
        await redis.aclose()


async def test_settings_in_the_url_win_and_aclose_closes_the_pool(settings: Settings) -> None:
    redis = open_redis(settings.model_copy(
        update={"redis_url": settings.redis_url + "?max_connections=7"}))
    pool = redis.connection_pool
    try:
        assert await redis.ping()
        assert pool.max_connections == 7
        idle = list(pool._available_connections)  # type: ignore[attr-defined]
        assert idle
        assert all(c.is_connected for c in idle)
    finally:
        await redis.aclose()
    assert not any(c.is_connected for c in idle)  # the client closed the pool it owns
