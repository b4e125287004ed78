"""200 trigger events across both workflows, on the real embedded broker and Redis."""

from __future__ import annotations

import pytest

from agentfabric.settings import Settings

from .helpers import cases, check_results, collect_results, publish_cases, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


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
    """A producer that knows nothing of agentfabric: raw aiokafka, JSON values, no headers."""
    import json

    from aiokafka import AIOKafkaProducer

    from streams.topics import TopicNames

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
