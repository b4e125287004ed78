"""The gateway end to end: the shipped catalog's HTTP tools against the sample CRM and ERP
(server processes), rate limits and breakers in the session's real Redis (shared by two
gateways, as by two replicas), audit events on the real broker's audit topic."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from agentfabric.errors import (
    ApprovalRequired,
    CircuitOpenError,
    ToolArgumentsError,
    TransientError,
)
from agentfabric.settings import Settings
from streams.kafka import Producer
from streams.reader import read_topic
from streams.topics import TopicNames, apply_topics
from tools.gateway.audit import AuditEvent
from tools.gateway.pipeline import Gateway, MemoryApprovalGrants, build_gateway
from tools.registry import ToolCall

from ..servicefixture import RunningServices

pytestmark = pytest.mark.integration


@pytest.fixture
def gw_settings(settings: Settings, services: RunningServices) -> Settings:
    return settings.model_copy(update={"service_urls": dict(services.urls)})


@pytest.fixture
async def producer(gw_settings: Settings) -> AsyncIterator[Producer]:
    await apply_topics(gw_settings.bootstrap_servers,
                       [TopicNames(gw_settings.topic_prefix).audit], partitions=1,
                       replication_factor=1)
    producer = Producer(gw_settings, client_id="test-gateway-audit")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def control(url: str, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as session, \
            session.request(method, url + path, json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def step_call(gateway: Gateway, tenant: str, run_id: str, key: str, *tools: str) -> ToolCall:
    """What the engine hands the gateway: the step's identity and its minted token."""
    call = ToolCall(tool=tools[0], idempotency_key=key, tenant=tenant, run_id=run_id,
                    agent="triage.act", workflow="triage", step="act")
    return dataclasses.replace(call, token=gateway.mint(call, list(tools)))


async def test_tools_against_the_sample_services_with_audit_on_kafka(
        gw_settings: Settings, redis_client: Redis, producer: Producer,
        services: RunningServices) -> None:
    tenant, run_id = f"t{uuid.uuid4().hex[:8]}", f"run-{uuid.uuid4().hex[:8]}"
    grants = MemoryApprovalGrants()
    gateway = build_gateway(gw_settings, redis_client, producer, grants=grants)
    crm, erp = services.urls["crm"], services.urls["erp"]
    try:
        call = step_call(gateway, tenant, run_id, f"{run_id}:1", "crm.get_account",
                         "crm.update_lead_score")
        account = await gateway.call("crm.get_account", {"domain": "contoso.com"}, call)
        assert account["found"] is True
        assert account["name"] == "Contoso Ltd"

        before = (await control(crm, "GET", "/_stats"))["calls"]
        with pytest.raises(ToolArgumentsError, match="score"):
            await gateway.call("crm.update_lead_score",
                               {"lead_id": "L-1", "score": 140, "segment": "smb"}, call)
        assert (await control(crm, "GET", "/_stats"))["calls"] == before  # never sent

        score = {"lead_id": "L-1", "score": 88, "segment": "enterprise", "owner": None}
        first = await gateway.call("crm.update_lead_score", score, call)
        again = await gateway.call("crm.update_lead_score", score, call)
        assert (first["applied"], again["applied"]) == (True, False)  # same key: once

        pay = step_call(gateway, tenant, run_id, f"{run_id}:pay", "erp.post_approval")
        decision = {"invoice_id": "INV-9", "amount": 25000, "currency": "EUR",
                    "approver": "ann", "decision": "approve"}
        with pytest.raises(ApprovalRequired) as caught:
            await gateway.call("erp.post_approval", decision, pay)
        assert caught.value.call_key == f"{run_id}:pay"
        grants.grant(caught.value.call_key)
        recorded = await gateway.call("erp.post_approval", decision, pay)
        assert recorded["status"] == "recorded"
        assert recorded["applied"] is True
        stats = await control(erp, "GET", "/_stats")
        assert stats["by_tenant"][tenant] == 1  # X-Tenant was sent
    finally:
        await gateway.close()  # flushes the audit events

    events = [AuditEvent.model_validate_json(record.value) async for record in
              read_topic(gw_settings, TopicNames(gw_settings.topic_prefix).audit)
              if record.key == run_id.encode()]
    assert [(e.tool, e.outcome) for e in events] == [
        ("crm.get_account", "ok"), ("crm.update_lead_score", "invalid_arguments"),
        ("crm.update_lead_score", "ok"), ("crm.update_lead_score", "ok"),
        ("erp.post_approval", "approval_required"), ("erp.post_approval", "ok")]
    assert all(e.agent == "triage.act" and e.tenant == tenant for e in events)
    raw = [json.loads(record.value) async for record in
           read_topic(gw_settings, TopicNames(gw_settings.topic_prefix).audit)]
    assert "contoso.com" not in json.dumps(raw)  # arguments are hashed, never stored


async def test_retries_and_a_breaker_shared_through_redis(
        gw_settings: Settings, redis_client: Redis, services: RunningServices) -> None:
    tenant, crm = f"t{uuid.uuid4().hex[:8]}", services.urls["crm"]
    one = build_gateway(gw_settings, redis_client, None)
    two = build_gateway(gw_settings, redis_client, None)  # another replica
    route = ["GET /accounts/{domain}"]
    try:
        await control(crm, "POST", "/_faults", {"status": 503, "count": 2, "routes": route})
        before = (await control(crm, "GET", "/_stats"))["calls"].get(route[0], 0)
        call = step_call(one, tenant, "run-r", "run-r:1", "crm.get_account")
        account = await one.call("crm.get_account", {"domain": "contoso.com"}, call)
        assert account["found"] is True
        after = (await control(crm, "GET", "/_stats"))["calls"][route[0]]
        assert after - before == 3  # two 503s, then the answer, within one call

        # the service goes down: 3 + 2 transient failures open the breaker (failures: 5)
        await control(crm, "POST", "/_faults", {"status": 503, "routes": route})
        for _ in range(2):
            with pytest.raises(TransientError, match=r"503|breaker"):
                await one.call("crm.get_account", {"domain": "contoso.com"}, call)
        sent = (await control(crm, "GET", "/_stats"))["calls"][route[0]]
        other = step_call(two, tenant, "run-r", "run-r:2", "crm.get_account")
        with pytest.raises(CircuitOpenError):
            await two.call("crm.get_account", {"domain": "contoso.com"}, other)
        assert (await control(crm, "GET", "/_stats"))["calls"][route[0]] == sent
        assert "crm.get_account: 1 call, 1 failed, breaker open" in two.summary()[0]
    finally:
        await control(crm, "DELETE", "/_faults")
        await one.close()
        await two.close()
