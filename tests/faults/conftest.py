"""The fault suite (`make faults`): workers killed, Redis stopped, services down, fuzzed
records. Each test starts its own processes, stops each by its pid, and prints its figures.

The suite is slow (minutes), so `make test` skips it: it runs only with ``AF_FAULTS=1``,
which `make faults` sets. (Not an ``AGENTFABRIC_*`` name: the CLI and the workers refuse
unknown settings of that prefix.)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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


