"""Guardrails on model-driven tool calls, end to end: a worker runs an llm step against the
local model server (the real openai client), its tool calls go through the gateway to the
real sample CRM service, and the audit events land on the real audit topic.

- a model asking for a tool its step does not declare is refused, told why, and audited;
- invalid arguments never reach the CRM (counted at the service);
- the per-run tool-call cap ends a runaway model with a clear result;
- a tool whose service keeps failing is answered by its fallback and the run is degraded.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentfabric.app import publish_events
from agentfabric.settings import Settings
from agents.model_server import ModelServerHandle
from schemas.models import RunResult, TriggerEvent
from streams.reader import read_topic
from streams.topics import TopicNames
from tests.modelfixture import models_file, scripted_server
from tests.servicefixture import RunningServices
from tools.gateway.audit import AuditEvent

from .helpers import collect_results, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CAP = 5
SCRIPT = {"rules": [
    {"match": {"workflow": "guarded", "user_contains": "sneaky"},
     "turns": [{"tool_calls": [{"name": "crm.update_lead_score",
                                "arguments": {"lead_id": "L-1", "score": 99,
                                              "segment": "hot"}}]},
               {"content": {"answer": "{{ tool_results[-1] }}"}}]},
    {"match": {"workflow": "guarded", "user_contains": "invalid"},
     "turns": [{"tool_calls": [{"name": "crm.get_account",
                                "arguments": {"domain": "NOT A DOMAIN"}}]},
               {"content": {"answer": "{{ tool_results[-1] }}"}}]},
    {"match": {"workflow": "guarded", "user_contains": "runaway"},
     "turns": [{"tool_calls": [{"name": "crm.get_account",
                                "arguments": {"domain": "contoso.com"}}]}]},
]}
WORKFLOW = {
    "name": "guarded", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [{"id": "agent", "kind": "llm", "model": "local",
               "prompt": "{{ input.case }}", "tools": ["crm.get_account"],
               "max_iterations": 20, "output_schema": {"type": "object"}}],
}


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServerHandle]:
    async with scripted_server(SCRIPT) as handle:
        yield handle


@pytest.fixture
def guarded_settings(settings: Settings, model_server: ModelServerHandle,
                     tmp_path: Path) -> Settings:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "guarded.yaml").write_text(yaml.safe_dump(WORKFLOW))
    models = models_file(tmp_path, model_server.url)
    return settings.model_copy(update={"workflows_dir": workflows, "models_file": models,
                                       "max_tool_calls_per_run": CAP})


def crm_stats(services: RunningServices) -> dict[str, Any]:
    with urllib.request.urlopen(f"{services.urls['crm']}/_stats", timeout=5) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


async def test_refusals_invalid_arguments_and_the_run_cap(
        guarded_settings: Settings, services: RunningServices) -> None:
    s = guarded_settings
    tenants = {case: f"{case}-{uuid.uuid4().hex[:8]}" for case in
               ("sneaky", "invalid", "runaway")}
    events = [TriggerEvent(event_id=f"ev-{case}", source="crm", event_type="lead.created",
                           tenant=tenant, payload={"case": case})
              for case, tenant in tenants.items()]
    names = TopicNames(s.topic_prefix)
    async with running_worker(s):
        await publish_events(s, names.trigger("crm"), events)
        results = await collect_results(s, "guarded", 3)
    by_case: dict[str, RunResult] = {r.event_id.removeprefix("ev-"): r for r in results}
    audit = [AuditEvent.model_validate_json(r.value)
             async for r in read_topic(s, names.audit)]
    by_tenant = crm_stats(services)["by_tenant"]

    # an undeclared tool: refused, the model told why, audited; nothing reached the CRM
    sneaky = by_case["sneaky"]
    assert sneaky.status == "completed"
    assert "refused" in sneaky.output["answer"]
    assert "crm.get_account" in sneaky.output["answer"]  # what it may call instead
    refused = [e for e in audit if e.tenant == tenants["sneaky"]]
    assert [(e.tool, e.outcome, e.agent) for e in refused] == [
        ("crm.update_lead_score", "refused", "guarded.agent")]
    assert tenants["sneaky"] not in by_tenant

    # invalid arguments: the model is told what is wrong; the CRM never saw the call
    invalid = by_case["invalid"]
    assert invalid.status == "completed"
    assert "domain" in invalid.output["answer"]
    assert [(e.tool, e.outcome) for e in audit if e.tenant == tenants["invalid"]] == [
        ("crm.get_account", "invalid_arguments")]
    assert tenants["invalid"] not in by_tenant

    # a runaway: ended at the cap with a clear result, the CRM called exactly CAP times
    runaway = by_case["runaway"]
    assert runaway.status == "tool_call_limit"
    assert runaway.output["status"] == "tool_call_limit"
    assert f"cap of {CAP} tool calls" in runaway.output["reason"]
    assert runaway.usage.tool_calls == CAP
    assert by_tenant[tenants["runaway"]] == CAP
    assert sum(1 for e in audit if e.tenant == tenants["runaway"] and e.outcome == "ok") == CAP
