"""The join store in Redis, shared by every replica; one Lua script makes each arrival atomic."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .batching import redis_unavailable

__all__ = ["RedisJoinStore"]

# KEYS: arrivals hash, emitter key. ARGV: branch, payload, total, ttl seconds.
_ARRIVE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then return false end
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[4])
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
return redis.call('HGETALL', KEYS[1])
"""


class RedisJoinStore:
    def __init__(self, redis: Redis, prefix: str, ttl_s: int) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:join:"
        self._ttl_s = ttl_s
        self._script = redis.register_script(_ARRIVE)

    async def arrive(self, key: str, branch: str, payload: str, total: int,
                     ) -> dict[str, str] | None:
        try:
            found = await self._script(
                keys=[self._prefix + key, self._prefix + key + ":emitter"],
                args=[branch, payload, total, self._ttl_s])
        except (RedisError, OSError) as exc:
            raise redis_unavailable(exc, doing="a parallel join") from exc
        if not found:
            return None
        items = [v.decode() if isinstance(v, bytes) else str(v) for v in found]
        return dict(zip(items[::2], items[1::2], strict=True))
