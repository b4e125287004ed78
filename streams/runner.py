"""A worker process: the router plus one consumer per step of the selected workflows,
sharing one producer and one Redis connection pool, until ``stop`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentfabric.errors import StackError, UnavailableError
from agentfabric.settings import Settings
from agents.engine import Engine

from .consumer import StepConsumer
from .handlers import Handler, RouterHandler, StepHandler
from .idempotency import RedisEmissionStore
from .joins import RedisJoinStore
from .kafka import Producer
from .topics import TopicNames

__all__ = ["Worker", "background_worker", "connect_redis"]

log = logging.getLogger(__name__)


async def connect_redis(settings: Settings) -> Redis:
    redis = Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        await redis.aclose()
        raise UnavailableError(f"cannot reach Redis at {settings.secret_free_redis_url} "
                             f"({type(exc).__name__}); start it with `agentfabric up` or set "
                             f"AGENTFABRIC_REDIS_URL") from exc
    return redis


class Worker:
    """Consumers for the router and every step of ``workflows`` (default: all loaded)."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 workflows: Sequence[str] | None = None, router: bool = True) -> None:
        self.settings = settings
        self.engine = engine
        self.names = TopicNames(settings.topic_prefix)
        selected = list(workflows) if workflows else engine.workflows.names()
        for name in selected:
            engine.workflows.latest(name)  # raises UnknownWorkflowError for a typo
        self.selected = selected
        self.router = router
        self.consumers: list[StepConsumer] = []
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def check_alive(self) -> None:
        """Raise the worker's error if it has stopped on one (for callers that wait on it)."""
        if self.task is not None and self.task.done():
            self.task.result()
            raise StackError("the worker has stopped")

    def _handlers(self, store: RedisEmissionStore) -> list[Handler]:
        handlers: list[Handler] = []
        if self.router:
            handlers.append(RouterHandler(self.engine, self.names, store))
        for name in self.selected:
            handlers.extend(
                StepHandler(self.engine, self.names, store, name, step,
                            self.settings.max_attempts)
                for step in self.engine.workflows.step_ids(name))
        return handlers

    async def _warm_up(self) -> None:
        """Load the embedding model before taking messages if a selected step looks up."""
        knowledge = self.engine.knowledge
        steps = [s for name in self.selected for s in self.engine.workflows.latest(name).steps]
        if knowledge is not None and any(step.uses_knowledge() for step in steps):
            await knowledge.embedder.embed(["warm-up"])

    async def run(self, stop: asyncio.Event) -> None:
        await self._warm_up()
        redis = await connect_redis(self.settings)
        producer = Producer(self.settings)
        try:
            await producer.start()
            store = RedisEmissionStore(redis, self.settings.topic_prefix,
                                       self.settings.idempotency_ttl_s)
            self.engine.joins = RedisJoinStore(redis, self.settings.topic_prefix,
                                               self.settings.idempotency_ttl_s)
            self.consumers = [StepConsumer(self.settings, h, producer, store)
                              for h in self._handlers(store)]
            tasks = [asyncio.create_task(c.run(stop), name=c.handler.name)
                     for c in self.consumers]
            watcher = asyncio.create_task(self._announce_ready(stop))
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        finally:
            await producer.stop()
            await redis.aclose()
            if self.engine.models is not None:
                await self.engine.models.close()
            log.info("worker stopped: processed %d messages",
                     sum(c.processed for c in self.consumers))

    async def _announce_ready(self, stop: asyncio.Event) -> None:
        waits = [asyncio.create_task(c.assigned.wait()) for c in self.consumers]
        try:
            await asyncio.gather(*waits)
        finally:
            for w in waits:
                w.cancel()
        self.ready.set()
        log.info("worker ready: %d consumers (%s)", len(self.consumers),
                 ", ".join(c.handler.name for c in self.consumers))


@contextlib.asynccontextmanager
async def background_worker(settings: Settings, engine: Engine, *,
                            ready_timeout_s: float = 60.0) -> AsyncIterator[Worker]:
    """Run a worker in this process for the block: ready on entry, drained on exit."""
    stop = asyncio.Event()
    worker = Worker(settings, engine)
    worker.task = asyncio.create_task(worker.run(stop))
    ready = asyncio.create_task(worker.ready.wait())
    try:
        done, _ = await asyncio.wait([ready, worker.task], timeout=ready_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        worker.check_alive()
        if ready not in done:
            raise StackError(f"the worker was not ready within {ready_timeout_s:.0f}s")
        yield worker
    finally:
        ready.cancel()
        stop.set()
        await asyncio.wait_for(worker.task, settings.shutdown_timeout_s)
