"""The journal of a step's completed calls in Redis: one list per step execution, written
as each call completes (pipelined with the other records in flight)."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio.client import Pipeline

from .batching import PipelinedRedis

__all__ = ["RedisJournal"]


class RedisJournal:
    def __init__(self, redis: PipelinedRedis, prefix: str, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:journal:"
        self._ttl_s = ttl_s

    async def load(self, key: str) -> list[dict[str, Any]]:
        [items] = await self._redis.execute(lambda pipe: pipe.lrange(self._prefix + key, 0, -1))
        return [json.loads(item) for item in items]

    async def append(self, key: str, entry: dict[str, Any]) -> None:
        text = json.dumps(entry, separators=(",", ":"), ensure_ascii=False)

        def build(pipe: Pipeline) -> None:
            pipe.rpush(self._prefix + key, text)
            pipe.expire(self._prefix + key, self._ttl_s)
        await self._redis.execute(build)

    async def truncate(self, key: str, keep: int) -> None:
        if keep == 0:
            await self._redis.execute(lambda pipe: pipe.delete(self._prefix + key))
        else:
            await self._redis.execute(lambda pipe: pipe.ltrim(self._prefix + key, 0, keep - 1))
