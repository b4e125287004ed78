"""The step cache and tenant budgets through a real worker: outputs cached in Redis serve
a second identical run without a model call; a tenant's spend, kept in Redis, stops its
next run before the model call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentfabric.app import publish_events
from agentfabric.settings import Settings, TenantBudget
from agents.model_server import ModelServerHandle
from schemas.models import TriggerEvent
from streams.topics import TopicNames
from tests.modelfixture import models_file, scripted_server

from .helpers import collect_results, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = {"rules": [{"match": {"workflow": "summarise"},
                     "turns": [{"content": "about {{ user }}"}]}]}
WORKFLOW = {
    "name": "summarise", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [{"id": "summary", "kind": "llm", "model": "local",
               "prompt": "summarise {{ input.domain }}", "cache": {"ttl_s": 300}}],
}


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServerHandle]:
    async with scripted_server(SCRIPT) as handle:
        yield handle


@pytest.fixture
def budget_settings(settings: Settings, model_server: ModelServerHandle,
                    tmp_path: Path) -> Settings:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "summarise.yaml").write_text(yaml.safe_dump(WORKFLOW))
    models = models_file(tmp_path, model_server.url, input_usd_per_mtok=0.0,
                         output_usd_per_mtok=1000.0)
    return settings.model_copy(update={
        "workflows_dir": workflows, "models_file": models,
        "tenant_budgets": {"tight": TenantBudget(max_cost_usd=1e-9, period_s=3600)}})


async def model_requests(server: ModelServerHandle) -> int:
    async with httpx.AsyncClient() as http:
        return len((await http.get(f"http://127.0.0.1:{server.port}/_requests")).json())


def event(n: int, tenant: str, domain: str) -> TriggerEvent:
    return TriggerEvent(event_id=f"ev-{n}", source="crm", event_type="lead.created",
                        tenant=tenant, payload={"domain": domain})


async def test_cache_and_tenant_budget_through_a_worker(
        budget_settings: Settings, model_server: ModelServerHandle,
        redis_client: Any) -> None:
    settings = budget_settings
    topic = TopicNames(settings.topic_prefix).trigger("crm")
    async with running_worker(settings):
        # cache: the second identical run of tenant acme is answered from Redis
        await publish_events(settings, topic, [event(1, "acme", "contoso.com")])
        await collect_results(settings, "summarise", 1)
        await publish_events(settings, topic, [event(2, "acme", "contoso.com")])
        await collect_results(settings, "summarise", 2)
        assert await model_requests(model_server) == 1
        # budget: tenant tight's first run spends past its tiny budget, so its second is
        # stopped before the model call (another input, so the cache does not answer it)
        await publish_events(settings, topic, [event(3, "tight", "litware.com")])
        await collect_results(settings, "summarise", 3)
        await publish_events(settings, topic, [event(4, "tight", "fabrikam.com")])
        results = await collect_results(settings, "summarise", 4)
    by_event = {r.event_id: r for r in results}
    assert by_event["ev-1"].output == by_event["ev-2"].output == "about summarise contoso.com"
    assert by_event["ev-1"].usage.output_tokens > 0
    assert by_event["ev-2"].usage.output_tokens == 0
    assert by_event["ev-3"].status == "completed"
    stopped = by_event["ev-4"]
    assert stopped.status == "budget_exceeded"
    assert stopped.output["step"] == "summary"
    assert "the budget of tenant 'tight' per 3600 s" in stopped.output["reason"]
    assert await model_requests(model_server) == 2  # acme once, tight once
    cached = [key async for key in redis_client.scan_iter(
        match=f"{settings.topic_prefix}:stepcache:*")]
    assert len(cached) == 2  # acme's contoso, tight's litware
    assert 0 < await redis_client.pttl(cached[0]) <= 300_000
    [spend] = [key async for key in redis_client.scan_iter(
        match=f"{settings.topic_prefix}:spend:tight:*")]
    spent = await redis_client.hgetall(spend)
    assert int(spent[b"tokens"]) == (by_event["ev-3"].usage.input_tokens
                                     + by_event["ev-3"].usage.output_tokens)
