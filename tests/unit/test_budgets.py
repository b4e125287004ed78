"""Budgets: a run or a tenant that would pass its token or cost budget is stopped before
the model call, and ends with status budget_exceeded and a reason; never a crash."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentfabric.errors import WorkflowError
from agentfabric.settings import TenantBudget
from agents.budgets import Budgets, BudgetSpec, MemorySpendStore, estimate_tokens
from agents.engine import Engine
from agents.loader import load_workflows, parse_workflow
from agents.model_server import ModelServerHandle
from agents.models import ModelClient, load_registry
from schemas.models import RunResult, StepMessage, TriggerEvent
from tests.faketools import Clock, sample_tools
from tests.modelfixture import models_file

pytestmark = pytest.mark.timeout(60)

# input tokens are free, output tokens cost 1000 USD per million: the prompt estimate of a
# first call is 0 USD, and any answer costs more than a tiny cost budget
PRICE_IN, PRICE_OUT = 0.0, 1000.0
TINY = 1e-9

SCRIPT = {"rules": [
    {"match": {"step": "fit"}, "turns": [
        {"tool_calls": [{"name": "crm.get_account",
                         "arguments": {"domain": "{{ user_json.domain }}"}}]},
        {"content": {"fit": "high", "account": "{{ tool_results[-1].name }}"}}]},
    {"match": {"step": "summary"}, "turns": [{"content": "short summary"}]}]}


def workflow(name: str, budget: dict[str, Any] | None = None,
             steps: tuple[str, ...] = ("fit",)) -> dict[str, Any]:
    defined: dict[str, dict[str, Any]] = {
        "fit": {"id": "fit", "kind": "llm", "model": "local",
                "prompt": '{"domain": "{{ input.domain }}"}', "tools": ["crm.get_account"],
                "output_schema": {"type": "object", "required": ["fit"]}},
        "summary": {"id": "summary", "kind": "llm", "model": "local",
                    "prompt": "Summarise {{ input.domain }}"}}
    doc: dict[str, Any] = {"name": name, "version": 1,
                           "trigger": {"source": "crm", "event_types": ["lead.created"]},
                           "steps": [defined[s] for s in steps]}
    if budget is not None:
        doc["budget"] = budget
    return doc


@pytest.fixture
def server(model_server: ModelServerHandle) -> ModelServerHandle:
    return model_server  # conftest: the server playing this module's SCRIPT


async def requests(server: ModelServerHandle) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        return list((await http.get(f"http://127.0.0.1:{server.port}/_requests")).json())


@pytest.fixture
async def engine_for(server: ModelServerHandle, tmp_path: Path,
                     ) -> AsyncIterator[Any]:
    made: list[Engine] = []

    def make(*docs: dict[str, Any]) -> Engine:
        folder = tmp_path / f"wf{len(made)}"
        folder.mkdir()
        for doc in docs:
            (folder / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))
        registry = load_registry(models_file(tmp_path, server.url,
                                             input_usd_per_mtok=PRICE_IN,
                                             output_usd_per_mtok=PRICE_OUT))
        engine = Engine(load_workflows(folder), sample_tools(),
                        models=ModelClient(registry, timeout_s=5, max_retries=0))
        made.append(engine)
        return engine

    try:
        yield make
    finally:
        for engine in made:
            assert engine.models is not None
            await engine.models.close()


def event(n: int, workflow: str, tenant: str = "acme") -> TriggerEvent:
    return TriggerEvent(event_id=f"ev-{n}", source="crm", event_type="lead.created",
                        tenant=tenant, workflow=workflow, payload={"domain": "contoso.com"})


async def run(engine: Engine, ev: TriggerEvent) -> RunResult:
    [emitted] = engine.start(ev)
    current: Any = emitted
    while isinstance(current, StepMessage):
        current = await engine.advance(current)
    assert isinstance(current, RunResult)
    return current


async def test_a_run_budget_stops_the_run_before_its_second_model_call(
        server: ModelServerHandle, engine_for: Any) -> None:
    engine = engine_for(workflow("fit_check", {"max_cost_usd": TINY}))
    result = await run(engine, event(1, "fit_check"))
    assert len(await requests(server)) == 1
    assert result.status == "budget_exceeded"
    assert result.output["status"] == "budget_exceeded"
    assert result.output["step"] == "fit"
    assert "the run's budget of 1e-09 USD would be exceeded before a call to model " \
           "'local' at step 'fit'" in result.output["reason"]
    assert result.path == ["fit"]
    assert result.usage.tool_calls == 1  # the tool the first answer asked for ran
    # the first call was made and paid for: it counts in the run's usage, once
    [made] = await requests(server)
    assert result.usage.input_tokens == made["prompt_tokens"]
    assert result.usage.output_tokens == made["completion_tokens"] > 0
    assert result.usage.cost_usd > TINY
    assert result.step_usage["fit"].output_tokens == made["completion_tokens"]


async def test_a_budget_counts_earlier_steps(server: ModelServerHandle,
                                             engine_for: Any) -> None:
    engine = engine_for(workflow("two_steps", {"max_cost_usd": TINY},
                                 steps=("summary", "fit")))
    result = await run(engine, event(1, "two_steps"))
    assert result.status == "budget_exceeded"
    assert result.output["step"] == "fit"
    assert result.path == ["summary", "fit"]
    assert result.usage.cost_usd > TINY
    assert [r["turn"] for r in await requests(server)] == [0]


async def test_the_prompt_estimate_alone_can_stop_the_first_call(
        server: ModelServerHandle, engine_for: Any) -> None:
    engine = engine_for(workflow("fit_check", {"max_tokens": 5}))
    result = await run(engine, event(1, "fit_check"))
    assert result.status == "budget_exceeded"
    assert "budget of 5 tokens would be exceeded" in result.output["reason"]
    assert "0 used, about" in result.output["reason"]
    assert await requests(server) == []


async def test_a_generous_budget_lets_the_run_finish(server: ModelServerHandle,
                                                     engine_for: Any) -> None:
    engine = engine_for(workflow("fit_check", {"max_tokens": 100_000, "max_cost_usd": 10}))
    result = await run(engine, event(1, "fit_check"))
    assert result.status == "completed"
    assert len(await requests(server)) == 2


async def test_a_tenant_budget_holds_across_runs_and_windows(
        server: ModelServerHandle, engine_for: Any) -> None:
    engine = engine_for(workflow("summarise", steps=("summary",)))
    clock = Clock(10_000.0)
    store = MemorySpendStore()
    engine.budgets = Budgets(tenants={"acme": TenantBudget(max_cost_usd=TINY, period_s=3600)},
                             store=store, clock=clock)
    first = await run(engine, event(1, "summarise"))
    assert first.status == "completed"
    second = await run(engine, event(2, "summarise"))
    assert second.status == "budget_exceeded"
    assert "the budget of tenant 'acme' per 3600 s" in second.output["reason"]
    assert len(await requests(server)) == 1
    other = await run(engine, event(3, "summarise", tenant="globex"))  # not limited
    assert other.status == "completed"
    tokens, cost = await store.spent("acme", int(clock.now // 3600))
    assert tokens == first.usage.input_tokens + first.usage.output_tokens
    assert cost == pytest.approx(first.usage.cost_usd)
    clock.now += 3600  # a new window
    assert (await run(engine, event(4, "summarise"))).status == "completed"
    assert len(await requests(server)) == 3


def test_estimate_is_a_quarter_of_the_request_text() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    assert 100 <= estimate_tokens(messages, None) <= 120


def test_a_budget_needs_a_limit() -> None:
    with pytest.raises(ValueError, match="max_tokens, max_cost_usd or both"):
        BudgetSpec()
    with pytest.raises(WorkflowError, match="budget"):
        parse_workflow(workflow("fit_check", {}), "fit_check.yaml")
    with pytest.raises(ValueError, match="max_tokens, max_cost_usd or both"):
        TenantBudget(period_s=60)


async def test_a_call_answered_from_the_journal_is_not_counted_twice(
        server: ModelServerHandle, engine_for: Any) -> None:
    """A step run again (a crash after its model call) gets the call from its journal: the
    tenant's spend counts the call once."""
    from agents.journal import MemoryJournal

    engine = engine_for(workflow("summarise", steps=("summary",)))
    engine.journal = MemoryJournal()
    store = MemorySpendStore()
    engine.budgets = Budgets(tenants={"acme": TenantBudget(max_tokens=10_000, period_s=3600)},
                             store=store, clock=Clock(10_000.0))
    [first] = engine.start(event(1, "summarise"))
    once = await engine.run_step(first)
    again = await engine.run_step(first)  # the same message: redelivered after a crash
    [result] = again.emitted
    assert isinstance(result, RunResult)
    assert result.status == "completed"
    assert [r.usage for r in once.emitted] == [r.usage for r in again.emitted]
    assert len(await requests(server)) == 1  # the model was asked once
    tokens, _ = await store.spent("acme", int(Clock(10_000.0)() // 3600))
    assert tokens == result.usage.input_tokens + result.usage.output_tokens
