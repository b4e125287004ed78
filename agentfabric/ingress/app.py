"""The ingress ASGI app (Starlette) and its uvicorn server.

``create_app(settings)`` validates the webhook sources and loads the workflows at once (a
misconfiguration stops ``agentfabric ingress`` before it listens). The lifespan starts the
producer (acks=all, sends bounded by ``AGENTFABRIC_INGRESS_SEND_TIMEOUT_S``), connects Redis,
builds the :class:`IngressContext` routes read from ``app.state.ctx``, runs the run store's
follower (``runstore.follow_results``: results and dead letters into Redis, for
``GET /runs/{id}``), and stops and closes them all on shutdown.

Routes: ``GET /healthz`` (the process answers), ``GET /readyz`` (Kafka and Redis answer: 200,
else 503), ``GET /metrics`` (Prometheus, the app's own registry: ``app.state.metrics``),
``POST /webhooks/{source}``, and the run API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agentfabric import tracing
from agentfabric.settings import Settings
from agentfabric.tenancy import TenantSigner
from agentfabric.worker import connect_redis
from agents.loader import load_workflows
from streams.kafka import Producer
from streams.topics import TopicNames

from .context import IngressContext
from .runs import run_routes
from .runstore import follow_results
from .sources import load_sources
from .webhooks import webhook_routes

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0
FOLLOWER_STOP_S = 2.0


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def _kafka_answers(bootstrap_servers: str) -> bool:
    """Some bootstrap server accepts a connection within the probe timeout."""
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                               PROBE_TIMEOUT_S)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def readyz(request: Request) -> JSONResponse:
    ctx: IngressContext = request.app.state.ctx
    kafka = await _kafka_answers(ctx.settings.bootstrap_servers)
    try:
        redis = bool(await asyncio.wait_for(ctx.redis.ping(), PROBE_TIMEOUT_S))
    except (RedisError, OSError, TimeoutError):
        redis = False
    ready = kafka and redis
    return JSONResponse({"status": "ready" if ready else "unavailable",
                         "kafka": "ok" if kafka else "unreachable",
                         "redis": "ok" if redis else "unreachable"},
                        status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": "5"})


def create_app(settings: Settings) -> Starlette:
    """The ingress app for ``settings``; raises ``ConfigError`` on a bad sources file or
    workflow. Nothing connects until the server starts it (the lifespan)."""
    sources = load_sources(settings)
    workflows = load_workflows(settings.workflows_dir)
    for source in sources.values():
        if source.event_source not in workflows.sources():
            log.warning("webhook source %s publishes to %s, which no loaded workflow starts "
                        "on: its events will be answered as ignored", source.name,
                        source.topic)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        traced = tracing.start(settings)  # a ConfigError without the otel extra
        producer = Producer(settings, client_id="agentfabric-ingress",
                            request_timeout_ms=int(settings.ingress_send_timeout_s * 1000))
        try:
            await producer.start()
        except BaseException:
            if traced:
                await tracing.stop()
            raise
        try:
            redis = await connect_redis(settings)
        except BaseException:
            await producer.stop()
            if traced:
                await tracing.stop()
            raise
        ctx = IngressContext(settings=settings, producer=producer, redis=redis,
                             workflows=workflows, names=TopicNames(settings.topic_prefix))
        app.state.ctx = ctx
        app.state.sources = sources
        app.state.signer = TenantSigner(settings, redis)
        stop = asyncio.Event()
        follower = asyncio.create_task(follow_results(ctx, stop), name="ingress-run-store")
        try:
            yield
        finally:
            stop.set()
            try:  # it notices within a poll; a consumer still joining its group is cancelled
                await asyncio.wait_for(follower, FOLLOWER_STOP_S)
            except TimeoutError:
                log.info("the run store follower did not stop within %ss; cancelled",
                         FOLLOWER_STOP_S)
            await producer.stop()
            await redis.aclose()
            if traced:  # flushes the spans not yet exported
                await tracing.stop()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *webhook_routes(),
        *run_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = CollectorRegistry()  # this app's own: nothing global
    ProcessCollector(registry=app.state.metrics)
    return app


async def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the ingress with uvicorn until SIGTERM or SIGINT: it stops accepting, lets the
    requests in flight finish, closes the lifespan, and returns (exit code 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own re-raises the signal after the graceful shutdown, so the process
            # would die of it; a clean stop on SIGTERM should exit 0
            signals = (signal.SIGINT, signal.SIGTERM)
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(create_app(settings), host=host or settings.ingress_host,
                            port=settings.ingress_port if port is None else port,
                            lifespan="on", ws="none", log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout_s))
    await Server(config).serve()
