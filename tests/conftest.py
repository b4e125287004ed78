"""Fixtures: the real embedded broker and a real Redis, started once per session on free
ports and stopped by pid; per-test settings with their own topic prefix."""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agentfabric.settings import Settings
from agents.loader import sample_workflows_dir
from agents.model_server import ModelServerHandle
from streams.embedded import EmbeddedStack, StackInfo, free_port, pid_alive

from .logcapture import captured_logs
from .modelfixture import scripted_server, workflow_folder
from .servicefixture import RunningServices, running_services

TEST_SESSION_TIMEOUT_MS = 6_000


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    state_dir: Path = tmp_path_factory.mktemp("stack")
    embedded = EmbeddedStack(state_dir, broker_port=free_port(), redis_port=free_port())
    info = embedded.start()
    try:
        yield info
    finally:
        embedded.stop()
        assert not pid_alive(info.broker.pid, info.broker.binary)
        assert not pid_alive(info.redis.pid, info.redis.binary)


@pytest.fixture(scope="session")
def rules_workflows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped samples that need no model or knowledge base: lead_enrichment v1 and
    invoice_triage. Tests of the fabric's mechanics run on these."""
    folder = tmp_path_factory.mktemp("workflows")
    for name in ("lead_enrichment.v1.yaml", "invoice_triage.yaml"):
        shutil.copy(sample_workflows_dir() / name, folder / name)
    return folder


@pytest.fixture
def settings(stack: StackInfo, services: RunningServices, rules_workflows: Path,
             monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for one test: the session stack and sample services, a topic prefix of its
    own (the services keep their data per tenant and idempotency key, so tests do not meet)."""
    for var in ("AGENTFABRIC_BOOTSTRAP_SERVERS", "AGENTFABRIC_REDIS_URL",
                "AGENTFABRIC_SERVICE_URLS"):
        monkeypatch.delenv(var, raising=False)
    # Kafka's smallest session: the embedded broker assigns a joining consumer after half
    # of it (3 s instead of 5 s per worker start); worker subprocesses inherit it
    monkeypatch.setenv("AGENTFABRIC_SESSION_TIMEOUT_MS", str(TEST_SESSION_TIMEOUT_MS))
    return Settings(bootstrap_servers=stack.bootstrap_servers, redis_url=stack.redis_url,
                    topic_prefix=f"t{uuid.uuid4().hex[:10]}", partitions=3,
                    fetch_max_wait_ms=10, workflows_dir=rules_workflows,
                    service_urls=services.urls, metrics_port=0,
                    session_timeout_ms=TEST_SESSION_TIMEOUT_MS)


@pytest.fixture
async def redis_client(stack: StackInfo) -> AsyncIterator[object]:
    from redis.asyncio import Redis

    client = Redis.from_url(stack.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[tuple[EmbeddedStack, StackInfo]]:
    """An embedded broker and Redis of this test's own (free ports), so it can stop and
    start Redis without touching the session stack; stopped by pid at the end."""
    embedded = EmbeddedStack(tmp_path / "stack", broker_port=free_port(),
                             redis_port=free_port())
    info = embedded.start()
    try:
        yield embedded, info
    finally:
        last = embedded.running() or info
        embedded.stop()
        for proc in (info.broker, info.redis, last.broker, last.redis):
            assert not pid_alive(proc.pid, proc.binary)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServices]:
    """The sample CRM and ERP as subprocesses on free ports: ``services.urls`` is
    ``{"crm": url, "erp": url}``; each is stopped by its pid at the end (and checked gone)."""
    with running_services(tmp_path_factory.mktemp("services")) as running:
        yield running


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """JSON logs (DEBUG and up) into a string; the root logger and structlog restored
    afterwards."""
    with captured_logs() as stream:
        yield stream


@pytest.fixture
async def model_server(request: pytest.FixtureRequest) -> AsyncIterator[ModelServerHandle]:
    """The local model server playing the test module's ``SCRIPT``."""
    async with scripted_server(request.module.SCRIPT) as handle:
        yield handle


@pytest.fixture
def llm_settings(settings: Settings, model_server: ModelServerHandle, tmp_path: Path,
                 request: pytest.FixtureRequest) -> Settings:
    """Settings running only the test module's ``WORKFLOW`` (its prompt fit.md) against
    ``model_server``, with priced tokens (1 and 2 USD per million in and out)."""
    return settings.model_copy(update=workflow_folder(
        tmp_path, request.module.WORKFLOW, model_server.url, input_usd_per_mtok=1.0,
        output_usd_per_mtok=2.0))
