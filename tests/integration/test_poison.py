"""No record can stop a consumer: a ~1 MiB event from a foreign producer and a record whose
header key is not UTF-8, among good events, on the real embedded broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from agentfabric.settings import Settings
from agentfabric.tenancy import TenantPolicy
from streams.topics import TopicNames

from .helpers import (
    cases,
    check_results,
    collect_dead_letters,
    collect_results,
    publish_cases,
    running_worker,
)
from .rawkafka import send_bad_header_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_one_mib_foreign_event_does_not_stop_the_worker(settings: Settings,
                                                                redis_client: Any) -> None:
    # the foreign producer's events are acme's: its source is configured so (docs/tenancy.md)
    settings = settings.model_copy(update={"trigger_tenants": {"erp": TenantPolicy(
        fixed="acme")}})
    names = TopicNames(settings.topic_prefix)
    batch = cases(120, seed=11)
    big = {"event_type": "invoice.posted", "event_id": "huge-1", "tenant": "acme",
           "payload": {"invoice_id": "INV-HUGE", "vendor_id": "V-1001", "amount": 450,
                       "currency": "USD", "invoice_date": "2026-11-01",
                       "due_date": "2026-12-01", "notes": "x" * (1024 * 1024)}}
    async with running_worker(settings) as worker:
        await publish_cases(settings, batch[:60])
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers,
                                    max_request_size=4 * 1024 * 1024)
        await producer.start()
        try:
            await producer.send_and_wait(names.trigger("erp"), json.dumps(big).encode(),
                                         key=b"huge-1")
        finally:
            await producer.stop()
        await publish_cases(settings, batch[60:])
        leads = await collect_results(settings, "lead_enrichment", 60)
        invoices = await collect_results(settings, "invoice_triage", 61)
        worker.check_alive()
    check_results([c for c in batch if c.workflow == "lead_enrichment"], leads)
    by_event = {r.event_id: r for r in invoices}
    assert by_event["huge-1"].output["queue"] == "auto-pay", "the big run completes too"
    check_results([c for c in batch if c.workflow == "invoice_triage"],
                  [r for r in invoices if r.event_id != "huge-1"])
    claims = [k async for k in redis_client.scan_iter(f"{settings.topic_prefix}:claim:*")]
    assert claims, "the big run's messages travelled as claim checks"


async def test_a_header_key_that_is_not_utf8_is_a_dead_letter(settings: Settings) -> None:
    names = TopicNames(settings.topic_prefix)
    batch = cases(40, seed=12)
    async with running_worker(settings) as worker:
        await publish_cases(settings, batch[:20])
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            for partition in range(settings.partitions):
                await send_bad_header_key(producer, names.trigger("crm"), b"bad-key",
                                          json.dumps({"event_type": "lead.created",
                                                      "payload": {"lead_id": "L-X"}}).encode(),
                                          partition=partition)
        finally:
            await producer.stop()
        await publish_cases(settings, batch[20:])
        letters = await collect_dead_letters(settings, settings.partitions)
        leads = await collect_results(settings, "lead_enrichment", 20)
        invoices = await collect_results(settings, "invoice_triage", 20)
        worker.check_alive()
    assert {d.error_type for d in letters} == {"DecodeError"}
    assert all("is not UTF-8" in d.reason for d in letters), letters[0].reason
    assert sorted(d.partition for d in letters) == list(range(settings.partitions))
    check_results([c for c in batch if c.workflow == "lead_enrichment"], leads)
    check_results([c for c in batch if c.workflow == "invoice_triage"], invoices)
