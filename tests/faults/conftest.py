"""The fault suite (`make faults`): workers killed, Redis stopped, services down, fuzzed
records. Each test starts its own processes, stops each by its pid, and prints its figures.

The suite is slow (minutes), so `make test` skips it: it runs only with ``AF_FAULTS=1``,
which `make faults` sets. (Not an ``AGENTFABRIC_*`` name: the CLI and the workers refuse
unknown settings of that prefix.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from streams.embedded import EmbeddedStack, StackInfo, free_port, pid_alive

from .harness import SideEffectService

FAULTS_ENV = "AF_FAULTS"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    enabled = os.environ.get(FAULTS_ENV) == "1"
    skip = pytest.mark.skip(reason=f"the fault suite runs with `make faults` ({FAULTS_ENV}=1)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.faults)
            if not enabled:
                item.add_marker(skip)


@pytest.fixture
async def service() -> AsyncIterator[SideEffectService]:
    svc = SideEffectService(latency_s=0.005)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


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
        for proc in (info.broker, info.redis, last.redis):
            assert not pid_alive(proc.pid, proc.binary)
