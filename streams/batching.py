"""Redis round trips shared by concurrent records: commands queued by many records in the
same moment go to Redis as one pipeline, so a window of records in flight pays one round
trip where it would pay one per record.

One pipeline is in flight at a time; what arrives meanwhile goes in the next one, so the
batch grows with the load and a lone record waits for at most one round trip ahead of it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from agentfabric.errors import UnavailableError

__all__ = ["PipelinedRedis", "redis_unavailable"]

Build = Callable[[Pipeline], object]


def redis_unavailable(exc: BaseException) -> UnavailableError:
    """A Redis failure as the runtime's 'try again later' error, saying what it was."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return UnavailableError(f"Redis is unavailable ({detail}); the message will be retried "
                            f"when it is back")


class PipelinedRedis:
    def __init__(self, redis: Redis, max_commands: int = 2000) -> None:
        self.redis = redis
        self._max = max_commands
        self._queue: deque[tuple[Build, asyncio.Future[list[Any]]]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    async def execute(self, build: Build) -> list[Any]:
        """Queue the commands ``build`` adds to a pipeline; their replies, in order."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((build, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch, size = [], 0
            while self._queue and size < self._max:
                batch.append(self._queue.popleft())
                size += 1
            await self._send(batch)

    async def _send(self, batch: list[tuple[Build, asyncio.Future[list[Any]]]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        counts = []
        for build, _ in batch:
            before = len(pipe.command_stack)
            build(pipe)
            counts.append(len(pipe.command_stack) - before)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(redis_unavailable(exc))
            return
        at = 0
        for (_, future), count in zip(batch, counts, strict=True):
            part = replies[at:at + count]
            at += count
            if future.done():  # its record was cancelled meanwhile
                continue
            error = next((r for r in part if isinstance(r, BaseException)), None)
            if error is not None:
                future.set_exception(redis_unavailable(error))
            else:
                future.set_result(part)
