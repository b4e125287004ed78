"""The gateway's shared state, seen from the sample CRM service while real workers run:

- a circuit breaker against a service that starts failing: it opens after the configured
  failures, the service then receives no calls (runs take the fallback and are marked
  degraded), a half-open probe goes through once the open period is over, it closes, and
  calls flow again;
- two worker processes share one rate limit: the service never sees more than the limit in
  any one-second window across both.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentfabric.app import build_engine, provision, publish_events
from agentfabric.settings import Settings
from schemas.models import RunResult, TriggerEvent
from streams.reader import read_topic
from streams.topics import TopicNames
from tests.faults.procs import Workers
from tests.servicefixture import RunningServices
from tools.gateway.audit import AuditEvent

from .helpers import collect_results, running_worker

pytestmark = [pytest.mark.integration]

ACCOUNT_PARAMETERS = {"type": "object", "required": ["domain"],
                      "properties": {"domain": {"type": "string"}}}


def control(services: RunningServices, method: str, path: str,
            body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{services.urls['crm']}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        answer: dict[str, Any] = json.loads(response.read() or b"{}")
    return answer


def setup(settings: Settings, tmp_path: Path, tool: dict[str, Any],
          step: dict[str, Any]) -> Settings:
    tools, workflows = tmp_path / "tools", tmp_path / "workflows"
    tools.mkdir()
    workflows.mkdir()
    (tools / "test.yaml").write_text(yaml.safe_dump({"tools": [tool]}))
    (workflows / "lookup.yaml").write_text(yaml.safe_dump({
        "name": "lookup", "version": 1,
        "trigger": {"source": "crm", "event_types": ["lead.created"]},
        "steps": [{"id": "look", "kind": "tool", "tool": tool["name"],
                   "args": {"domain": "{{ input.domain }}"}, **step}]}))
    return settings.model_copy(update={"tools_dirs": [tools], "workflows_dir": workflows})


def events(tenant: str, first: int, n: int) -> list[TriggerEvent]:
    return [TriggerEvent(event_id=f"{tenant}-{i}", source="crm", event_type="lead.created",
                         tenant=tenant, payload={"domain": "contoso.com"})
            for i in range(first, first + n)]


async def two_workers_run(s: Settings, tmp_path: Path, tenant: str,
                          runs: int) -> list[RunResult]:
    """Two worker processes (``agentfabric worker`` with the settings ``s``) run ``runs``
    events of ``tenant``; checks that each run has a result and both workers took part."""
    await provision(s, build_engine(s))
    workers = Workers(s, tmp_path)
    try:
        pair = [workers.start(), workers.start()]
        for worker in pair:
            await worker.ready()
        await publish_events(s, TopicNames(s.topic_prefix).trigger("crm"),
                             events(tenant, 0, runs))
        results = await collect_results(s, "lookup", runs, within=90)
    finally:
        await workers.close()
    assert len({r.run_id for r in results}) == runs
    assert all(w.processed() > 0 for w in pair), "both workers took part"
    return results


@pytest.mark.timeout(120)
async def test_breaker_opens_sends_one_probe_and_closes(
        settings: Settings, services: RunningServices, tmp_path: Path) -> None:
    s = setup(settings, tmp_path, {
        "name": "crm.account_fragile", "parameters": ACCOUNT_PARAMETERS,
        "http": {"service": "crm", "method": "GET", "path": "/accounts/{domain}"},
        "retry": {"attempts": 1}, "timeout_s": 5,
        "breaker": {"failures": 3, "window_s": 60, "open_s": 2, "half_open_probes": 1},
        "fallback": {"answer": {"found": False, "source": "fallback"}},
    }, {"max_in_flight": 1}).model_copy(update={"partitions": 1})
    tenant = f"b{uuid.uuid4().hex[:8]}"
    names = TopicNames(s.topic_prefix)
    control(services, "POST", "/_faults", {"status": 503, "routes": ["GET /accounts/{domain}"]})
    try:
        async with running_worker(s):
            await publish_events(s, names.trigger("crm"), events(tenant, 0, 10))
            failing = await collect_results(s, "lookup", 10)
            seen_while_failing = control(services, "GET", "/_stats")["by_tenant"][tenant]
            control(services, "DELETE", "/_faults")
            await asyncio.sleep(2.5)  # the open period passes: the next call is the probe
            await publish_events(s, names.trigger("crm"), events(tenant, 10, 5))
            results = await collect_results(s, "lookup", 15)
    finally:
        control(services, "DELETE", "/_faults")
    # three calls failed and opened the breaker; the other seven reached no service
    assert seen_while_failing == 3
    assert all(r.status == "completed" for r in failing)
    assert all(r.output == {"found": False, "source": "fallback"} for r in failing)
    assert all(r.degraded and "crm.account_fragile" in r.degraded[0] for r in failing)
    # after recovery: the probe succeeded, the breaker closed, every call went through
    recovered = [r for r in results if int(r.event_id.rsplit("-", 1)[1]) >= 10]
    assert len(recovered) == 5
    assert all(r.output["found"] is True and not r.degraded for r in recovered)
    assert control(services, "GET", "/_stats")["by_tenant"][tenant] == 3 + 5
    audit = [AuditEvent.model_validate_json(r.value)
             async for r in read_topic(s, names.audit)]
    outcomes = [e.outcome for e in audit if e.tenant == tenant]
    assert outcomes.count("ok") == 5
    assert outcomes.count("fallback") == 10


@pytest.mark.timeout(180)
async def test_two_worker_processes_share_one_rate_limit(
        settings: Settings, services: RunningServices, tmp_path: Path) -> None:
    limit, runs = 10, 60
    s = setup(settings, tmp_path, {
        "name": "crm.account_paced", "parameters": ACCOUNT_PARAMETERS,
        "http": {"service": "crm", "method": "GET", "path": "/accounts/{domain}"},
        "rate_limit": {"limit": limit, "period_s": 1, "max_wait_s": 60},
    }, {}).model_copy(update={"partitions": 4})
    tenant = f"r{uuid.uuid4().hex[:8]}"
    await two_workers_run(s, tmp_path, tenant, runs)
    arrivals = sorted(control(services, "GET", "/_stats")["arrivals"][tenant])
    assert len(arrivals) == runs
    busiest = max(sum(1 for t in arrivals[i:] if t - start < 1.0)
                  for i, start in enumerate(arrivals))
    assert busiest <= limit * 1.1, f"{busiest} calls within one second (limit {limit})"
    assert arrivals[-1] - arrivals[0] >= (runs - limit) / limit * 0.9


@pytest.mark.timeout(180)
async def test_two_worker_processes_share_one_breaker(
        settings: Settings, services: RunningServices, tmp_path: Path) -> None:
    runs, failures = 40, 3
    s = setup(settings, tmp_path, {
        "name": "crm.account_shared", "parameters": ACCOUNT_PARAMETERS,
        "http": {"service": "crm", "method": "GET", "path": "/accounts/{domain}"},
        "retry": {"attempts": 1}, "timeout_s": 5,
        "breaker": {"failures": failures, "window_s": 60, "open_s": 60},
        "fallback": {"answer": {"found": False, "source": "fallback"}},
    }, {"max_in_flight": 1}).model_copy(update={"partitions": 4})
    tenant = f"s{uuid.uuid4().hex[:8]}"
    control(services, "POST", "/_faults", {"status": 503, "routes": ["GET /accounts/{domain}"]})
    try:
        results = await two_workers_run(s, tmp_path, tenant, runs)
    finally:
        control(services, "DELETE", "/_faults")
    assert all(r.degraded for r in results)  # failed or refused by the open breaker
    # at most one call per partition was in flight when the third failure opened it, in
    # either process; after that neither process called the service
    seen = control(services, "GET", "/_stats")["by_tenant"][tenant]
    assert failures <= seen <= failures + 3, seen
