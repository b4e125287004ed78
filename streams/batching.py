"""Redis round trips shared by concurrent records: commands queued by many records in the
same moment go to Redis as one pipeline, so a window of records in flight pays one round
trip where it would pay one per record.

One pipeline is in flight at a time; what arrives meanwhile goes in the next one, so the
batch grows with the load and a lone record waits for at most one round trip ahead of it.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentfabric.errors import UnavailableError

from .dlq import redact
from .logcontext import detached_task

__all__ = ["PipelinedRedis", "redis_unavailable"]

Build = Callable[[Pipeline], object]


# what redis-py's pools say when every connection is checked out: the blocking pool after
# its wait, the plain pool at once (MaxConnectionsError in redis-py >= 6)
_POOL_EXHAUSTED = frozenset({"No connection available.", "Too many connections"})


def redis_unavailable(exc: BaseException, *, doing: str = "",
                      retried: bool = True) -> UnavailableError:
    """A Redis failure as the runtime's 'try again later' error, whose one-sentence reason
    says what to fix (the consumer logs it and retries the record in place until then).

    redis-py strips the error code from replies it has a class for (``OOM`` becomes an
    ``OutOfMemoryError`` with the rest of the text), while an error raised inside a Lua
    script arrives as a plain ``ResponseError`` with the code in its text, so both the
    class and the text are checked. Credentials in the text are masked. ``doing`` names
    the operation (e.g. "a parallel join"); ``retried=False`` leaves out what happens to
    the records meanwhile (for a caller that gives up, such as a worker starting)."""
    text = redact(re.sub(r"\b([a-z][a-z0-9+.-]*://)[^/\s@]*@", r"\1***@", str(exc),
                         flags=re.IGNORECASE))[:300]
    found = re.search(r"\b(OOM|READONLY|MISCONF|WRONGTYPE|NOAUTH|WRONGPASS|NOPERM|LOADING)\b",
                      text)
    code = found[1] if found else str(getattr(exc, "status_code", "") or "")
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    during = f", during {doing}" if doing else ""
    prefix_setting = "AGENTFABRIC_TOPIC_PREFIX"  # agentfabric's keys are '<prefix>:...'
    if isinstance(exc, OutOfMemoryError) or code == "OOM":
        what = f"Redis is out of memory (OOM{during})"
        fix = ("raise its maxmemory or free memory; agentfabric needs maxmemory-policy "
               "noeviction")
        wait = "records wait here until Redis has room"
    elif isinstance(exc, ReadOnlyError) or code == "READONLY":
        what = f"Redis refused a write because it is a read-only replica (READONLY{during})"
        fix = "point AGENTFABRIC_REDIS_URL at the primary"
        wait = "records wait here until writes succeed"
    elif code == "MISCONF":
        what = f"Redis refuses writes because it cannot persist to disk (MISCONF{during})"
        fix = ("free disk space or fix the permissions of its data dir (the Redis log says "
               "which)")
        wait = "records wait here until it can persist again"
    elif code == "WRONGTYPE":
        what = (f"a Redis key of agentfabric's holds a value of another type "
                f"(WRONGTYPE{during}), so something else writes keys that start with "
                f"agentfabric's prefix")
        fix = (f"set {prefix_setting} to a prefix nothing else uses, or give agentfabric its "
               f"own Redis database in AGENTFABRIC_REDIS_URL")
        wait = "records wait here until the key holds what agentfabric wrote"
    elif isinstance(exc, AuthenticationError) or code in ("NOAUTH", "WRONGPASS"):
        what = f"Redis refused agentfabric's credentials ({code or 'AuthenticationError'}{during})"
        fix = ("set the right user and password in AGENTFABRIC_REDIS_URL "
               "(redis://USER:PASSWORD@HOST:PORT/DB)")
        wait = "records are retried until it accepts them"
    elif isinstance(exc, NoPermissionError | AuthorizationError) or code == "NOPERM":
        what = f"the Redis user may not run a command agentfabric needs (NOPERM{during})"
        fix = (f"allow it in the Redis ACL to read and write the keys that start with "
               f"{prefix_setting} and to run EVALSHA and EVAL")
        wait = "records are retried until it may"
    elif isinstance(exc, BusyLoadingError) or code == "LOADING":
        what = f"Redis is loading its data after a restart (LOADING{during})"
        fix = "nothing to fix, wait until it has loaded"
        wait = "records resume by themselves"
    elif isinstance(exc, RedisTimeoutError | TimeoutError):
        what = f"Redis is unavailable: it did not answer in time ({detail}{during})"
        fix = "check its load (a slow command or script blocks it) and the network to it"
        wait = "records are retried until it answers"
    elif isinstance(exc, RedisConnectionError) and str(exc) in _POOL_EXHAUSTED:
        what = f"every Redis connection this process may open stayed in use ({detail}{during})"
        fix = ("check Redis's load (slow commands hold connections), or raise "
               "AGENTFABRIC_REDIS_MAX_CONNECTIONS or AGENTFABRIC_REDIS_POOL_WAIT_S")
        wait = "records are retried until a connection is free"
    elif isinstance(exc, RedisConnectionError | OSError):
        what = f"Redis is unavailable ({detail}{during})"
        fix = "start it (`agentfabric up` for the embedded one) or fix AGENTFABRIC_REDIS_URL"
        wait = "records are retried until it is back"
    else:
        what = f"Redis is unavailable ({detail}{during})"
        fix = "see the Redis log"
        wait = "records are retried until it answers"
    translated = UnavailableError(f"{what}: {fix}; {wait}" if retried else f"{what}: {fix}")
    translated.__cause__ = exc  # also where it is not raised `from` (a pipeline's replies)
    return translated


class PipelinedRedis:
    def __init__(self, redis: Redis, max_commands: int = 2000) -> None:
        self.redis = redis
        self._max = max_commands
        self._queue: deque[tuple[Build, asyncio.Future[list[Any]]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._sha: dict[str, str] = {}
        self._loading = asyncio.Lock()

    async def _sha_of(self, text: str) -> str:
        sha = self._sha.get(text)
        if sha is None:
            async with self._loading:  # one load, not one per record waiting for it
                sha = self._sha.get(text)
                if sha is None:
                    try:
                        [sha] = await self.execute(lambda pipe: pipe.script_load(text))
                    except NoScriptError as exc:  # not expected from SCRIPT LOAD
                        raise redis_unavailable(exc) from exc
                    self._sha[text] = sha
        return str(sha)

    async def script(self, text: str, calls: list[tuple[list[str], list[Any]]],
                     *, reloaded: bool = False) -> list[Any]:
        """Run the Lua script ``text`` once per (keys, args), sharing the round trip with
        whatever else is queued; scripts are loaded again if Redis restarted and forgot
        them."""
        sha = await self._sha_of(text)

        def build(pipe: Pipeline) -> None:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
        try:
            return await self.execute(build)
        except NoScriptError as exc:
            self._sha.pop(text, None)
            if reloaded:  # loaded a moment ago and forgotten again: something is off
                raise redis_unavailable(exc, doing="running a script it had just loaded") \
                    from exc
            return await self.script(text, calls, reloaded=True)

    async def execute(self, build: Build) -> list[Any]:
        """Queue the commands ``build`` adds to a pipeline; their replies, in order."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((build, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = detached_task(self._flush(), name="redis-flush")
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
            if isinstance(error, NoScriptError):
                future.set_exception(error)  # the caller loads its script and tries again
            elif error is not None:
                future.set_exception(redis_unavailable(error))
            else:
                future.set_result(part)
