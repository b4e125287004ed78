"""The Python client against the real broker and Redis with a worker running: run a workflow
and get its result, time out with the run id, publish and read results, dead letters."""

from __future__ import annotations

import random

import pytest

from agentfabric.app import build_engine, provision
from agentfabric.client import Client
from agentfabric.errors import ConfigError, RunTimeoutError, UnroutableEventError
from agentfabric.settings import Settings
from agents.engine import run_id_for
from schemas.models import RunResult, TriggerEvent

from .helpers import collect_dead_letters, collect_results, invoice_case, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_run_returns_the_result(settings: Settings) -> None:
    case = invoice_case(1, random.Random(3))
    async with running_worker(settings), Client(settings) as client:
        result = await client.run("invoice_triage", case.event.payload, tenant="acme",
                                  timeout=30)
        again = await client.run("invoice_triage", case.event.payload, timeout=30)
    assert isinstance(result, RunResult)
    assert result.workflow == "invoice_triage"
    assert result.status == "completed"
    assert result.tenant == "acme"
    for key, value in case.expected.items():
        assert result.output[key] == value
    assert again.run_id != result.run_id, "each run() is a run of its own"
    assert again.tenant == "default"


async def test_run_without_a_result_in_time_names_the_run(settings: Settings) -> None:
    # topics exist, but no worker runs the steps: the run cannot finish
    await provision(settings, build_engine(settings))
    case = invoice_case(2, random.Random(3))
    async with Client(settings) as client:
        with pytest.raises(RunTimeoutError) as caught:
            await client.run("invoice_triage", case.event.payload, tenant="acme", timeout=1.5)
    error = caught.value
    assert error.workflow == "invoice_triage"
    assert f"run {error.run_id} of invoice_triage has no result after 1.5s" in error.reason
    assert "agentfabric results invoice_triage" in error.reason


async def test_publish_then_read_results(settings: Settings) -> None:
    event = TriggerEvent(event_id="c-1", source="crm", event_type="lead.created",
                         tenant="globex", payload={"lead_id": "L-1", "email": "a@contoso.com",
                                                   "title": "VP Sales"})
    async with running_worker(settings), Client(settings) as client:
        run_ids = await client.publish(event)
        other = await client.publish({"event_type": "lead.created", "event_id": "c-2",
                                      "payload": {"lead_id": "L-2", "email": "b@litware.com"}},
                                     source="crm")
        with pytest.raises(UnroutableEventError):
            await client.publish({"event_type": "lead.deleted", "payload": {}}, source="crm")
        await collect_results(settings, "lead_enrichment", 2)
        found = [r async for r in client.results("lead_enrichment")]
    assert run_ids == [run_id_for(event, "lead_enrichment")]
    by_run = {r.run_id: r for r in found}
    assert by_run[run_ids[0]].tenant == "globex", "published signed, for its own tenant"
    assert by_run[run_ids[0]].output["lead_id"] == "L-1"
    assert by_run[other[0]].tenant == "default"


async def test_dead_letters_and_replay(settings: Settings) -> None:
    """A foreign event naming a tenant its source is not configured for dead-letters; once
    the source is configured, replaying it starts its run."""
    from aiokafka import AIOKafkaProducer

    from agentfabric.tenancy import TenantPolicy
    from streams.topics import TopicNames

    body = (b'{"event_type": "lead.created", "event_id": "f-1", "tenant": "acme", '
            b'"payload": {"lead_id": "L-9", "email": "c@contoso.com"}}')
    async with running_worker(settings), Client(settings) as client:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(TopicNames(settings.topic_prefix).trigger("crm"),
                                         body, key=b"f-1")
        finally:
            await producer.stop()
        await collect_dead_letters(settings, 1)
        [letter] = await client.dead_letters(error="TenantError")
        assert await client.dead_letters(workflow="invoice_triage") == []
    configured = settings.model_copy(update={"trigger_tenants": {"crm": TenantPolicy(
        fixed="acme")}})
    async with running_worker(configured), Client(configured) as client:
        outcome = await client.replay([letter.dead_letter_id[:8]])  # a unique prefix
        [result] = await collect_results(configured, "lead_enrichment", 1)
        with pytest.raises(ConfigError, match="no dead letters match"):
            await client.replay(["ffffffff-nope"])
    assert outcome.replayed == [letter.dead_letter_id]
    assert outcome.failed == {}
    assert (result.tenant, result.output["lead_id"]) == ("acme", "L-9")


async def test_a_client_not_started_says_so(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="async with Client"):
        await Client(settings).run("invoice_triage", {})
