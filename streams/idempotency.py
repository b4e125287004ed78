"""Idempotent steps: remember what a step emitted, keyed by the message's idempotency key.

Per key the store holds the encoded output messages and whether the broker acknowledged
them. A redelivered message whose output was acknowledged emits nothing again; one whose
output was stored but not acknowledged re-emits exactly the stored bytes, so a step's
side effects and its output happen once per key even across crashes.
"""

from __future__ import annotations

import base64
import json
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from .batching import PipelinedRedis
from .kafka import Outgoing

__all__ = ["EmissionStore", "MemoryEmissionStore", "Recall", "RedisEmissionStore"]

Recall = tuple[list[Outgoing] | None, bool]


def _dump(messages: list[Outgoing]) -> str:
    b64 = base64.b64encode
    return json.dumps([{
        "topic": m.topic, "key": b64(m.key).decode() if m.key is not None else None,
        "value": b64(m.value).decode(),
        "headers": [[k, b64(v).decode()] for k, v in m.headers]} for m in messages])


def _load(text: str | bytes) -> list[Outgoing]:
    b64 = base64.b64decode
    return [Outgoing(topic=m["topic"], key=b64(m["key"]) if m["key"] is not None else None,
                     value=b64(m["value"]),
                     headers=tuple((k, b64(v)) for k, v in m["headers"]))
            for m in json.loads(text)]


class EmissionStore(Protocol):
    async def recall(self, key: str) -> Recall:
        """(stored output or None, whether it was acknowledged)."""

    async def remember(self, key: str, messages: list[Outgoing]) -> None: ...

    async def acknowledge(self, key: str) -> None: ...

    async def forget(self, key: str) -> None:
        """Drop a stored output that could not be sent, so a replay computes it afresh."""


class RedisEmissionStore:
    """The store in Redis, shared by every replica; entries expire after ``ttl_s``.
    Concurrent records share round trips (see ``streams.batching``)."""

    def __init__(self, redis: Redis | PipelinedRedis, prefix: str, ttl_s: int) -> None:
        self._redis = redis if isinstance(redis, PipelinedRedis) else PipelinedRedis(redis)
        self._prefix = f"{prefix}:emitted:"
        self._ttl_s = ttl_s

    async def recall(self, key: str) -> Recall:
        [entry] = await self._redis.execute(lambda pipe: pipe.hgetall(self._prefix + key))
        out = entry.get(b"out")
        return (_load(out) if out is not None else None), entry.get(b"acked") == b"1"

    async def remember(self, key: str, messages: list[Outgoing]) -> None:
        text = _dump(messages)

        def build(pipe: Pipeline) -> None:
            pipe.hset(self._prefix + key, "out", text)
            pipe.expire(self._prefix + key, self._ttl_s)
        await self._redis.execute(build)

    async def acknowledge(self, key: str) -> None:
        def build(pipe: Pipeline) -> None:
            pipe.hset(self._prefix + key, "acked", "1")
            pipe.expire(self._prefix + key, self._ttl_s)
        await self._redis.execute(build)

    async def forget(self, key: str) -> None:
        await self._redis.execute(lambda pipe: pipe.delete(self._prefix + key))


class MemoryEmissionStore:
    """The same contract in memory, for unit tests."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, bool]] = {}

    async def recall(self, key: str) -> Recall:
        if key not in self.entries:
            return None, False
        out, acked = self.entries[key]
        return _load(out), acked

    async def remember(self, key: str, messages: list[Outgoing]) -> None:
        self.entries[key] = (_dump(messages), False)

    async def acknowledge(self, key: str) -> None:
        out, _ = self.entries[key]
        self.entries[key] = (out, True)

    async def forget(self, key: str) -> None:
        self.entries.pop(key, None)

