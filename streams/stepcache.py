"""Redis stores of the engine's step cache and of the tenants' model spend: plain keys
under ``<prefix>:stepcache:`` (expiring with each step's ``ttl_s``) and one hash per
tenant and budget window under ``<prefix>:spend:`` (expiring two periods after it
starts). Both go through the pipelined client shared with the other records in flight."""

from __future__ import annotations

import math

from redis.asyncio.client import Pipeline

from .batching import PipelinedRedis

__all__ = ["RedisSpendStore", "RedisStepCache"]


class RedisStepCache:
    def __init__(self, redis: PipelinedRedis, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:stepcache:"

    async def get(self, key: str) -> str | None:
        [value] = await self._redis.execute(lambda pipe: pipe.get(self._prefix + key))
        return None if value is None else bytes(value).decode()

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        await self._redis.execute(lambda pipe: pipe.set(self._prefix + key, value, px=ttl_ms))


class RedisSpendStore:
    def __init__(self, redis: PipelinedRedis, prefix: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:spend:"

    def _key(self, tenant: str, window: int) -> str:
        return f"{self._prefix}{tenant}:{window}"

    async def spent(self, tenant: str, window: int) -> tuple[int, float]:
        [values] = await self._redis.execute(
            lambda pipe: pipe.hmget(self._key(tenant, window), ["tokens", "cost"]))
        tokens, cost = values
        return int(tokens or 0), float(cost or 0.0)

    async def add(self, tenant: str, window: int, period_s: float, tokens: int,
                  cost_usd: float) -> None:
        key = self._key(tenant, window)

        def build(pipe: Pipeline) -> None:
            pipe.hincrby(key, "tokens", tokens)
            pipe.hincrbyfloat(key, "cost", cost_usd)
            pipe.expire(key, math.ceil(period_s * 2))
        await self._redis.execute(build)
