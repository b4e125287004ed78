"""The tenant of a run comes from its source, not from the event body: foreign producers on
the real broker and Redis, under the default policy, a fixed tenant, a header allow-list,
and agentfabric's signed events."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from agentfabric.app import publish_events
from agentfabric.settings import Settings
from agentfabric.tenancy import TenantPolicy, tenant_headers
from schemas.models import TriggerEvent
from streams.topics import TopicNames

from .helpers import collect_dead_letters, collect_results, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def lead(event_id: str, **extra: Any) -> dict[str, Any]:
    return {"event_type": "lead.created", "event_id": event_id,
            "payload": {"lead_id": f"L-{event_id}", "email": "pat@contoso.com",
                        "title": "VP Sales"}, **extra}


def invoice(event_id: str, **extra: Any) -> dict[str, Any]:
    return {"event_type": "invoice.posted", "event_id": event_id,
            "payload": {"invoice_id": f"INV-{event_id}", "vendor_id": "V-1001",
                        "amount": 450, "currency": "USD", "invoice_date": "2026-11-01",
                        "due_date": "2026-12-01", "po_number": "PO-1"}, **extra}


async def send_raw(settings: Settings, source: str,
                   events: list[tuple[dict[str, Any], list[tuple[str, bytes]]]]) -> None:
    """Plain JSON records with the given headers, as a producer that is not agentfabric."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        for body, headers in events:
            await producer.send_and_wait(TopicNames(settings.topic_prefix).trigger(source),
                                         json.dumps(body).encode(),
                                         key=body["event_id"].encode(), headers=headers)
    finally:
        await producer.stop()


async def test_the_default_policy_and_signed_events(settings: Settings) -> None:
    redis = Redis.from_url(settings.redis_url)
    try:
        acme_sig = await tenant_headers(settings, redis, "acme", "forged-1")
    finally:
        await redis.aclose()
    async with running_worker(settings) as worker:
        await send_raw(settings, "crm", [
            (lead("foreign-1", tenant="acme"), []),      # names a tenant, unsigned
            (lead("forged-1", tenant="globex"), acme_sig),  # signed for acme, says globex
            (lead("plain-1"), []),                       # names none: tenant default
        ])
        await publish_events(settings, TopicNames(settings.topic_prefix).trigger("crm"), [
            TriggerEvent(source="crm", tenant="globex", **lead("signed-1"))])
        letters = await collect_dead_letters(settings, 2)
        results = await collect_results(settings, "lead_enrichment", 2)
        worker.check_alive()
    by_key = {d.key: d for d in letters}
    assert {d.error_type for d in letters} == {"TenantError"}
    foreign = by_key[b"foreign-1"].reason
    assert "the event names tenant 'acme' but arrived unsigned" in foreign
    assert "source 'crm' has no tenant policy" in foreign
    assert "AGENTFABRIC_TRIGGER_TENANTS" in foreign
    assert "names tenant 'globex' but was published for tenant 'acme'" in \
        by_key[b"forged-1"].reason
    assert {r.event_id: r.tenant for r in results} == {"plain-1": "default",
                                                      "signed-1": "globex"}


async def test_a_fixed_source_and_a_header_allow_list(settings: Settings) -> None:
    s = settings.model_copy(update={"trigger_tenants": {
        "crm": TenantPolicy(fixed="acme"),
        "erp": TenantPolicy(header="x-tenant", allow=("acme", "globex"))}})
    async with running_worker(s) as worker:
        await send_raw(s, "crm", [(lead("crm-1", tenant="acme"), []), (lead("crm-2"), []),
                                  (lead("crm-3", tenant="globex"), [])])
        await send_raw(s, "erp", [(invoice("erp-1"), [("x-tenant", b"globex")]),
                                  (invoice("erp-2", tenant="acme"), [("x-tenant", b"acme")]),
                                  (invoice("erp-3"), [("x-tenant", b"initech")]),
                                  (invoice("erp-4"), []),
                                  (invoice("erp-5", tenant="acme"), [("x-tenant", b"globex")])])
        leads = await collect_results(s, "lead_enrichment", 2)
        invoices = await collect_results(s, "invoice_triage", 2)
        letters = await collect_dead_letters(s, 4)
        worker.check_alive()
    assert {r.event_id: r.tenant for r in leads} == {"crm-1": "acme", "crm-2": "acme"}
    assert {r.event_id: r.tenant for r in invoices} == {"erp-1": "globex", "erp-2": "acme"}
    reasons = {d.key: d.reason for d in letters}
    assert {d.error_type for d in letters} == {"TenantError"}
    assert "source 'crm' is fixed to tenant 'acme'" in reasons[b"crm-3"]
    assert "names tenant 'initech', which is not in the allow-list of source 'erp'" in \
        reasons[b"erp-3"]
    assert "without the header x-tenant" in reasons[b"erp-4"]
    assert "names tenant 'acme' but its header x-tenant says 'globex'" in reasons[b"erp-5"]
