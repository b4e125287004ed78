"""`agentfabric demo`, the main job, as `make demo` runs it: every sample event gets its
result, the malformed one its dead letter, and everything it started is stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.embedded import free_port, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_demo_prints_every_result_and_cleans_up(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")},
           "AGENTFABRIC_STATE_DIR": str(tmp_path / "state"),
           "AGENTFABRIC_VECTOR_DIR": str(tmp_path / "vectors"),
           "AGENTFABRIC_BROKER_PORT": str(free_port()),
           "AGENTFABRIC_REDIS_PORT": str(free_port()),
           "AGENTFABRIC_CRM_PORT": str(free_port()),
           "AGENTFABRIC_ERP_PORT": str(free_port())}
    spawned: list[int] = []
    proc = subprocess.Popen([sys.executable, "-m", "agentfabric", "demo", "--keep"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        state = tmp_path / "state" / "stack.json"
        if state.exists():  # --keep left the stack up so that we can check what ran
            data = json.loads(state.read_text())
            spawned = [data["broker"]["pid"], data["redis"]["pid"],
                       *(proc["pid"] for proc in data.get("services", {}).values())]
            subprocess.run([sys.executable, "-m", "agentfabric", "down"], env=env, check=True,
                           capture_output=True, timeout=60)
    assert proc.returncode == 0, out
    assert "invoice_triage: 6 results" in out
    assert "lead_enrichment: 8 results" in out
    assert "14 runs completed" in out
    assert "Dead letters: 1" in out
    assert "240 company descriptions embedded" in out
    for event in [f"crm-evt-100{i}" for i in range(1, 9)] + [f"erp-evt-500{i}" for i in
                                                             range(1, 7)]:
        assert event in out, event
    # the sample workflows called the CRM and ERP through the gateway: a line per tool
    for line in ("crm.get_account: 16 calls, 0 failed, breaker closed",
                 "crm.update_lead_score: 8 calls, 0 failed, breaker closed",
                 "erp.get_vendor: 6 calls, 0 failed, breaker closed",
                 "erp.validate_invoice: 6 calls, 0 failed, breaker closed",
                 "erp.post_approval: 1 call, 0 failed, breaker closed"):
        assert line in out, line
    assert len(spawned) == 4
    assert not any(pid_alive(pid) for pid in spawned)
