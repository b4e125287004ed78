"""Idempotent steps: remember what a step emitted, keyed by the message's idempotency key.

Per key the store holds the encoded output messages until the broker acknowledged them,
then only that they were acknowledged. A redelivered message whose output was acknowledged
emits nothing again; one whose output was stored but not acknowledged re-emits exactly the
stored bytes, so a step's side effects and its output happen once per key even across
crashes.
"""

from __future__ import annotations

import base64
import json
from typing import Protocol

from redis.asyncio import Redis

from .batching import PipelinedRedis
from .kafka import Outgoing

__all__ = ["EmissionStore", "MemoryEmissionStore", "Recall", "RedisEmissionStore"]

Recall = tuple[list[Outgoing] | None, bool]
_PENDING, _ACKED = b"P", b"A"


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

    One string per key: ``P`` + the stored output while it is pending, then just ``A`` once
    acknowledged (the output is not needed any more), so every operation is one command.
    Concurrent records share round trips (see ``streams.batching``)."""

    def __init__(self, redis: Redis | PipelinedRedis, prefix: str, ttl_s: int) -> None:
        self._redis = redis if isinstance(redis, PipelinedRedis) else PipelinedRedis(redis)
        self._prefix = f"{prefix}:emitted:"
        self._ttl_s = ttl_s

    async def recall(self, key: str) -> Recall:
        [entry] = await self._redis.execute(lambda pipe: pipe.get(self._prefix + key))
        if entry is None:
            return None, False
        if entry[:1] == _ACKED:
            return None, True
        return _load(entry[1:]), False

    async def remember(self, key: str, messages: list[Outgoing]) -> None:
        value = _PENDING + _dump(messages).encode()
        await self._redis.execute(
            lambda pipe: pipe.set(self._prefix + key, value, ex=self._ttl_s))

    async def acknowledge(self, key: str) -> None:
        await self._redis.execute(
            lambda pipe: pipe.set(self._prefix + key, _ACKED, ex=self._ttl_s))

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
        return (None if acked else _load(out)), acked

    async def remember(self, key: str, messages: list[Outgoing]) -> None:
        self.entries[key] = (_dump(messages), False)

    async def acknowledge(self, key: str) -> None:
        self.entries[key] = ("", True)

    async def forget(self, key: str) -> None:
        self.entries.pop(key, None)

