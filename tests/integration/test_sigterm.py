"""A worker process sent SIGTERM mid-stream, then restarted, loses no run.

Events are published continuously while the first worker runs; it gets SIGTERM part way,
must exit 0 after finishing and committing its in-flight work, and a second worker
takes over. Every run completes exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentfabric.app import build_engine, provision
from agentfabric.settings import Settings

from .helpers import cases, check_results, collect_results, publish_cases

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TOTAL = 200
BATCH = 10


def _start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ,
           "AGENTFABRIC_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "AGENTFABRIC_REDIS_URL": settings.redis_url,
           "AGENTFABRIC_TOPIC_PREFIX": settings.topic_prefix,
           "AGENTFABRIC_WORKFLOWS_DIR": str(settings.workflows_dir),
           "AGENTFABRIC_SERVICE_URLS": json.dumps(settings.service_urls)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agentfabric", "worker", "--log-level", "INFO"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def _wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes],
                         within: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"worker exited early:\n{log.read_text()}"
        assert asyncio.get_running_loop().time() < deadline, f"no '{text}':\n{log.read_text()}"
        await asyncio.sleep(0.1)


async def test_sigterm_mid_stream_loses_no_run(settings: Settings, tmp_path: Path) -> None:
    await provision(settings, build_engine(settings))
    batch = cases(TOTAL, seed=21)
    log1, log2 = tmp_path / "worker1.log", tmp_path / "worker2.log"
    first = _start_worker(settings, log1)
    second: subprocess.Popen[bytes] | None = None
    try:
        await _wait_for_line(log1, "worker ready", first)
        for i in range(0, TOTAL, BATCH):
            await publish_cases(settings, batch[i:i + BATCH])
            if i == TOTAL // 2:
                first.send_signal(signal.SIGTERM)
            if i == TOTAL // 2 + 3 * BATCH:
                code = await asyncio.to_thread(first.wait, 60)
                assert code == 0, f"worker did not exit cleanly:\n{log1.read_text()}"
                second = _start_worker(settings, log2)
            await asyncio.sleep(0.05)
        assert second is not None
        leads = [c for c in batch if c.workflow == "lead_enrichment"]
        results = [*await collect_results(settings, "lead_enrichment", len(leads), 120),
                   *await collect_results(settings, "invoice_triage", TOTAL - len(leads), 120)]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert second.returncode == 0, log2.read_text()
    check_results(batch, results)
    # both workers did real work: the stream was cut in the middle, not before or after
    for log in (log1, log2):
        match = re.search(r"worker stopped: processed (\d+) messages", log.read_text())
        assert match, log.read_text()
        assert int(match[1]) > 0, log.read_text()
