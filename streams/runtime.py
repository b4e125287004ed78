"""The runtime of a worker process: one consumer per executor, sharing one producer and one
Redis connection (whose round trips concurrent records share), until ``stop`` is set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from agentfabric.settings import Settings

from .batching import PipelinedRedis
from .claims import ClaimStore
from .consumer import StepConsumer
from .executor import Executor
from .idempotency import EmissionStore, RedisEmissionStore
from .kafka import Producer
from .landed import LandedCheck
from .metrics import Observe, StreamMetrics
from .stages import Stage, default_stages

__all__ = ["Runtime", "StagesFactory"]

log = logging.getLogger(__name__)

StagesFactory = Callable[[Producer, EmissionStore], list[Stage]]


class Runtime:
    """Consumers for ``executors``; ``ready`` is set once every one has its partitions.
    With ``metrics``, every record is observed (``streams.metrics.Observe``, the first of
    the default stages) and the consumers' lag is sampled while they run."""

    def __init__(self, settings: Settings, executors: Sequence[Executor],
                 redis: Redis | PipelinedRedis, *,
                 stages: StagesFactory | None = None,
                 metrics: StreamMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        observe = Observe(metrics) if metrics is not None else None
        self.executors = list(executors)
        self.redis = redis if isinstance(redis, PipelinedRedis) else PipelinedRedis(redis)
        claims = ClaimStore(self.redis, settings.topic_prefix, settings.idempotency_ttl_s,
                            settings.claim_check_bytes)
        # stored outputs found again after a crash are looked for on the broker first
        self.stages = stages or (lambda producer, store: default_stages(
            producer, store, claims, settings.lease_ttl_s, observe,
            LandedCheck(settings, producer.partitions_for)))
        self.consumers: list[StepConsumer] = []
        self.ready = asyncio.Event()

    @property
    def processed(self) -> int:
        return sum(c.processed for c in self.consumers)

    async def run(self, stop: asyncio.Event) -> None:
        producer = Producer(self.settings)
        await producer.start()
        try:
            store = RedisEmissionStore(self.redis, self.settings.topic_prefix,
                                       self.settings.idempotency_ttl_s)
            self.consumers = [StepConsumer(self.settings, e, self.stages(producer, store),
                                           self.metrics) for e in self.executors]
            tasks = [asyncio.create_task(c.run(stop), name=c.name) for c in self.consumers]
            watcher = asyncio.create_task(self._announce_ready())
            sampler = (asyncio.create_task(self.metrics.sample_lag_every(self.consumers))
                       if self.metrics is not None else None)
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                helpers = [t for t in (watcher, sampler) if t is not None]
                for task in helpers:
                    task.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
        finally:
            await producer.stop()
            for consumer in self.consumers:
                await consumer.pipeline.close()

    async def _announce_ready(self) -> None:
        await asyncio.gather(*(c.assigned.wait() for c in self.consumers))
        self.ready.set()
        log.info("worker ready: %d consumers (%s)", len(self.consumers),
                 ", ".join(c.name for c in self.consumers))
