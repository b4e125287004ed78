"""A worker process: the router plus one consumer per step of the selected workflows,
wired from the engine into the runtime, until ``stop`` is set. Every worker also registers
hand-offs, resumes decided runs and sweeps expired approval requests (``approvals``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agents.budgets import Budgets
from agents.engine import Engine
from streams.batching import PipelinedRedis, redis_unavailable
from streams.consumer import StepConsumer
from streams.joins import RedisJoinStore
from streams.journal import RedisJournal
from streams.kafka import Producer
from streams.metrics import MetricsServer, StreamMetrics
from streams.redispool import open_redis
from streams.runtime import Runtime
from streams.stepcache import RedisSpendStore, RedisStepCache
from streams.topics import TopicNames
from tools.gateway.audit import KafkaAuditSink
from tools.gateway.breaker import RedisBreakers
from tools.gateway.pipeline import Gateway, redis_prefix
from tools.gateway.ratelimit import RedisRateLimiter

from . import tracing
from .approvals import ApprovalStore, DecisionPublisher, RedisApprovalGrants, sweep
from .errors import StackError
from .executors import approval_executors, executors_for
from .ledger import LedgerExecutor, RunLedger
from .settings import Settings
from .tenancy import TenantVerifier

__all__ = ["Worker", "background_worker", "connect_redis"]

log = logging.getLogger(__name__)


async def connect_redis(settings: Settings) -> Redis:
    """A client for ``redis_url`` that has answered a PING; warns (once, at start-up) when
    the server's settings endanger runs: an evicting ``maxmemory-policy`` or no persistence.
    Managed services often disable CONFIG; then nothing is checked."""
    url = settings.secret_free_redis_url
    redis = open_redis(settings)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        await redis.aclose()
        raise redis_unavailable(exc, doing=f"the first PING to {url}", retried=False) from exc
    try:
        found: dict[str, str] = {}
        for name in ("maxmemory-policy", "appendonly", "save"):
            reply = await redis.config_get(name)
            found.update({k.decode() if isinstance(k, bytes) else str(k):
                          v.decode() if isinstance(v, bytes) else str(v)
                          for k, v in reply.items()})
    except RedisError as exc:
        log.debug("Redis at %s does not show its configuration (%s); not checked", url, exc)
        return redis
    policy = found.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        log.warning("Redis at %s has maxmemory-policy %s: set it to noeviction, since evicting "
                    "agentfabric's idempotency or join keys runs steps twice or strands "
                    "parallel runs", url, policy)
    if found.get("appendonly") == "no" and not found.get("save"):
        log.warning("Redis at %s persists nothing (appendonly no, no save points): a Redis "
                    "restart loses parallel joins and stored outputs; set appendonly yes",
                    url)
    return redis


class Worker:
    """Consumers for the router and every step of ``workflows`` (default: all loaded)."""

    def __init__(self, settings: Settings, engine: Engine, *,
                 workflows: Sequence[str] | None = None, router: bool = True) -> None:
        self.settings = settings
        self.engine = engine
        selected = list(workflows) if workflows else engine.workflows.names()
        for name in selected:
            engine.workflows.latest(name)  # raises UnknownWorkflowError for a typo
        self.selected = selected
        self.router = router
        self.runtime: Runtime | None = None
        # one registry per worker: the runtime's families and the gateway's (GET /metrics)
        self.registry = CollectorRegistry()
        self.metrics = StreamMetrics(self.registry, settings.topic_prefix)
        if isinstance(engine.tools, Gateway):
            self.registry.register(engine.tools.metrics.registry)
        self.metrics_url: str | None = None
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def consumers(self) -> list[StepConsumer]:
        return self.runtime.consumers if self.runtime is not None else []

    @property
    def processed(self) -> int:
        return self.runtime.processed if self.runtime is not None else 0

    def check_alive(self) -> None:
        """Raise the worker's error if it has stopped on one (for callers that wait on it)."""
        if self.task is not None and self.task.done():
            self.task.result()
            raise StackError("the worker has stopped")

    async def _warm_up(self) -> None:
        """Load the embedding model before taking messages if a selected step looks up."""
        knowledge = self.engine.knowledge
        steps = [s for name in self.selected for s in self.engine.workflows.latest(name).steps]
        if knowledge is not None and any(step.uses_knowledge() for step in steps):
            await knowledge.embedder.embed(["warm-up"])

    async def _connect_gateway(self, redis: Redis, stack: contextlib.AsyncExitStack) -> None:
        """Give the engine's tool gateway its shared state: rate limits, breakers and
        approval grants in Redis, audit events on the audit topic (its own producer)."""
        gateway = self.engine.tools
        if not isinstance(gateway, Gateway):
            return  # a plain registry (tests): nothing shared to connect
        producer = Producer(self.settings, client_id="agentfabric-audit")
        await producer.start()
        stack.push_async_callback(producer.stop)
        prefix = self.settings.topic_prefix
        gateway.connect(
            rate_limiter=RedisRateLimiter(redis, prefix=redis_prefix(self.settings, "rl")),
            breakers=RedisBreakers(redis, prefix=redis_prefix(self.settings, "cb")),
            audit=KafkaAuditSink(producer, TopicNames(prefix).audit),
            grants=RedisApprovalGrants(redis, prefix))
        stack.push_async_callback(gateway.close)  # flushes the audit events first

    def _serve_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        """Serve GET /metrics on ``metrics_port`` (0: not at all) until the worker stops."""
        if self.engine.on_cache is None:
            self.engine.on_cache = self.metrics.cache
        port = self.settings.metrics_port
        if not port:
            return
        try:
            server = MetricsServer(self.registry, self.settings.metrics_host, port)
        except OSError as exc:
            log.warning("metrics are not served: %s:%d cannot be bound (%s); give each worker "
                        "on this host its own AGENTFABRIC_METRICS_PORT (or --metrics-port)",
                        self.settings.metrics_host, port, exc)
            return
        self.metrics_url = server.url
        stack.push_async_callback(server.stop)
        log.info("metrics at %s", server.url)

    async def run(self, stop: asyncio.Event) -> None:
        await self._warm_up()
        redis = await connect_redis(self.settings)
        stack = contextlib.AsyncExitStack()
        try:
            if tracing.start(self.settings):  # a ConfigError without the otel extra
                stack.push_async_callback(tracing.stop)  # last: flushes every span
            self._serve_metrics(stack)
            self.engine.joins = RedisJoinStore(redis, self.settings.topic_prefix,
                                               self.settings.idempotency_ttl_s)
            shared = PipelinedRedis(redis)  # concurrent records share round trips
            self.engine.journal = RedisJournal(shared, self.settings.topic_prefix,
                                               self.settings.idempotency_ttl_s)
            self.engine.approval_expiry_s = self.settings.approval_expiry_s
            self.engine.cache = RedisStepCache(shared, self.settings.topic_prefix)
            self.engine.budgets = Budgets(
                tenants=self.settings.tenant_budgets,
                store=RedisSpendStore(shared, self.settings.topic_prefix))
            approvals = ApprovalStore(shared, self.settings.topic_prefix,
                                      self.settings.idempotency_ttl_s,
                                      self.settings.approval_expiry_s)
            await self._connect_gateway(redis, stack)
            self.runtime = Runtime(self.settings, [
                *executors_for(self.engine, self.settings, self.selected, router=self.router,
                               tenancy=await TenantVerifier.load(self.settings, redis)),
                *approval_executors(self.engine, self.settings, approvals),
                LedgerExecutor(self.settings, RunLedger(redis, self.settings.topic_prefix))],
                shared,
                metrics=self.metrics)
            announce = asyncio.create_task(self._announce_ready(self.runtime))
            publisher = DecisionPublisher(self.settings, shared, "agentfabric-approvals")
            sweeper = asyncio.create_task(sweep(approvals, publisher,
                                                self.settings.approval_sweep_interval_s, stop),
                                          name="approvals-sweeper")
            try:
                await self.runtime.run(stop)
            finally:
                announce.cancel()
                sweeper.cancel()
                await asyncio.gather(announce, sweeper, return_exceptions=True)
                await publisher.close()
        finally:
            await stack.aclose()
            await redis.aclose()
            if self.engine.models is not None:
                await self.engine.models.close()
            log.info("worker stopped: processed %d messages", self.processed)

    async def _announce_ready(self, runtime: Runtime) -> None:
        await runtime.ready.wait()
        self.ready.set()


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
