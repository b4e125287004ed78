"""200 trigger events across both workflows, on the real embedded broker and Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentfabric.settings import Settings

from .helpers import cases, check_results, collect_results, publish_cases, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWS = """
- name: research
  version: 1
  trigger: {source: crm, event_types: [research]}
  steps:
    - {id: fan, kind: parallel, branches: [firmo, label], join: combine}
    - {id: firmo, kind: tool, tool: crm.get_account, args: {domain: "{{ input.domain }}"},
       next: size}
    - {id: size, kind: workflow, workflow: doubler, input: {n: "{{ steps.firmo.employees }}"},
       next: combine}
    - {id: label, kind: transform, output: "{{ upper(input.domain) }}", next: shout}
    - {id: shout, kind: loop, body: bang, until: "len(steps.bang) >= len(steps.label) + 1",
       next: combine}
    - {id: bang, kind: transform,
       output: "{{ (steps.bang if has(steps, 'bang') else steps.label) + '!' }}", next: shout}
    - id: combine
      kind: transform
      output: {company: "{{ steps.firmo.name }}", size: "{{ steps.firmo.employees }}",
               label: "{{ steps.bang }}", doubled: "{{ steps.size.x }}"}
- name: doubler
  version: 1
  trigger: {source: crm, event_types: [double]}
  steps:
    - {id: twice, kind: transform, output: {x: "{{ input.n * 2 }}"}}
"""


async def test_200_events_give_200_correct_results(settings: Settings) -> None:
    batch = cases(200)
    leads = [c for c in batch if c.workflow == "lead_enrichment"]
    invoices = [c for c in batch if c.workflow == "invoice_triage"]
    async with running_worker(settings) as worker:
        await publish_cases(settings, batch)
        results = [*await collect_results(settings, "lead_enrichment", len(leads)),
                   *await collect_results(settings, "invoice_triage", len(invoices))]
        assert sum(c.processed for c in worker.consumers) >= 200
    assert len(results) == 200
    check_results(batch, results)
    for result in results:
        assert result.status == "completed"
        assert result.usage.steps == len(result.path)
        assert result.trace_parent is not None
        assert result.trace_parent.startswith("00-")


async def test_redelivered_trigger_does_not_run_twice(settings: Settings) -> None:
    batch = cases(6, seed=11)
    async with running_worker(settings):
        await publish_cases(settings, batch)
        first = await collect_results(settings, "lead_enrichment", 3)
        await publish_cases(settings, batch)  # the same events again (a webhook retry)
        await publish_cases(settings, cases(1, seed=12, first_id=100))  # a new one to wait on
        again = await collect_results(settings, "lead_enrichment", 4)
    assert len(first) == 3
    assert len(again) == 4, "a redelivered event started its runs a second time"


async def test_plain_json_from_a_foreign_producer_starts_runs(settings: Settings) -> None:
    """A producer that knows nothing of agentfabric: raw aiokafka, JSON values, no headers
    (its sources are configured as acme's, the tenant its events name: docs/tenancy.md)."""
    import json

    from aiokafka import AIOKafkaProducer

    from agentfabric.tenancy import TenantPolicy
    from streams.topics import TopicNames

    acme = TenantPolicy(fixed="acme")
    settings = settings.model_copy(update={"trigger_tenants": {"crm": acme, "erp": acme}})
    batch = cases(20, seed=5, first_id=500)
    async with running_worker(settings):
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            for case in batch:
                event = case.event.model_dump(mode="json", exclude={"source", "occurred_at"})
                await producer.send_and_wait(
                    TopicNames(settings.topic_prefix).trigger(case.event.source),
                    json.dumps(event).encode(), key=case.event.event_id.encode())
        finally:
            await producer.stop()
        results = [*await collect_results(settings, "lead_enrichment", 10),
                   *await collect_results(settings, "invoice_triage", 10)]
    check_results(batch, results)


async def test_loop_parallel_and_sub_workflow_through_the_worker(
        settings: Settings, tmp_path: Path) -> None:
    """Flow kinds on the real broker: joins in Redis, sub-workflow results resume callers."""
    from agentfabric.app import publish_events
    from schemas.models import TriggerEvent
    from streams.topics import TopicNames

    workflows = tmp_path / "workflows"
    workflows.mkdir()
    for doc in yaml.safe_load(FLOWS):
        (workflows / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))
    flow_settings = settings.model_copy(update={"workflows_dir": workflows})
    events = [TriggerEvent(event_id=f"r{i}", source="crm", event_type="research",
                           payload={"domain": domain})
              for i, domain in enumerate(["contoso.com", "litware.com", "nowhere.org"] * 10)]
    async with running_worker(flow_settings):
        await publish_events(flow_settings, TopicNames(settings.topic_prefix).trigger("crm"),
                             events)
        results = await collect_results(flow_settings, "research", len(events))
    assert len(results) == len(events), "each fan-out joined exactly once"
    by_event = {r.event_id: r.output for r in results}
    assert by_event["r0"] == {"company": "Contoso Ltd", "size": 18500, "label": "CONTOSO.COM!",
                              "doubled": 37000}
    assert by_event["r2"]["company"] is None
