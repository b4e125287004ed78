"""The opt-in step cache: a cached llm step runs once for identical runs (no model, no
tool the second time); another tenant, another input or an expired entry is a miss."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentfabric.errors import WorkflowError
from agents.cache import MemoryStepCache, cache_key
from agents.engine import Engine
from agents.loader import load_workflows, parse_workflow
from agents.model_server import ModelServerHandle
from agents.models import ModelClient, load_registry
from schemas.models import RunResult, StepMessage, TriggerEvent
from tests.faketools import Clock, SampleTools
from tests.modelfixture import models_file
from tools.registry import ToolCall

pytestmark = pytest.mark.timeout(60)

SCRIPT = {"rules": [{"match": {"workflow": "fit_check", "step": "fit"}, "turns": [
    {"tool_calls": [{"name": "crm.get_account",
                     "arguments": {"domain": "{{ user_json.domain }}"}}]},
    {"content": {"fit": "high", "account": "{{ tool_results[-1].name }}"}}]}]}


def workflow(cache: dict[str, Any] | None) -> dict[str, Any]:
    fit: dict[str, Any] = {"id": "fit", "kind": "llm", "model": "local",
                           "prompt": '{"domain": "{{ input.domain }}"}',
                           "tools": ["crm.get_account"],
                           "output_schema": {"type": "object", "required": ["fit"]}}
    if cache is not None:
        fit["cache"] = cache
    return {"name": "fit_check", "version": 1,
            "trigger": {"source": "crm", "event_types": ["lead.created"]},
            "steps": [fit, {"id": "label", "kind": "transform",
                            "output": "{{ steps.fit.account + ': ' + steps.fit.fit }}"}]}


class CountingTools(SampleTools):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def call(self, name: str, arguments: Mapping[str, Any], call: ToolCall) -> Any:
        self.calls += 1
        return await super().call(name, arguments, call)


@pytest.fixture
def server(model_server: ModelServerHandle) -> ModelServerHandle:
    return model_server  # conftest: the server playing this module's SCRIPT


async def requests(server: ModelServerHandle) -> int:
    async with httpx.AsyncClient() as http:
        return len((await http.get(f"http://127.0.0.1:{server.port}/_requests")).json())


def make_engine(server: ModelServerHandle, folder: Path, tools: SampleTools,
                cache: dict[str, Any] | None = None) -> Engine:
    folder.mkdir(exist_ok=True)
    (folder / "fit_check.yaml").write_text(yaml.safe_dump(workflow(cache)))
    registry = load_registry(models_file(folder.parent, server.url, input_usd_per_mtok=1.0,
                                         output_usd_per_mtok=2.0))
    return Engine(load_workflows(folder), tools,
                  models=ModelClient(registry, timeout_s=5, max_retries=0))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def setup(server: ModelServerHandle, tmp_path: Path, clock: Clock,
                ) -> AsyncIterator[tuple[Engine, CountingTools, list[tuple[str, str, bool]]]]:
    tools = CountingTools()
    engine = make_engine(server, tmp_path / "wf", tools, {"ttl_s": 60})
    engine.cache = MemoryStepCache(clock)
    seen: list[tuple[str, str, bool]] = []
    engine.on_cache = lambda wf, step, hit: seen.append((wf, step, hit))
    try:
        yield engine, tools, seen
    finally:
        assert engine.models is not None
        await engine.models.close()


def event(n: int, domain: str = "contoso.com", tenant: str = "acme") -> TriggerEvent:
    return TriggerEvent(event_id=f"ev-{n}", source="crm", event_type="lead.created",
                        tenant=tenant, payload={"domain": domain})


async def run(engine: Engine, ev: TriggerEvent) -> RunResult:
    [emitted] = engine.start(ev)
    current: Any = emitted
    while isinstance(current, StepMessage):
        current = await engine.advance(current)
    assert isinstance(current, RunResult)
    return current


async def test_identical_runs_call_the_model_and_tools_once(
        server: ModelServerHandle,
        setup: tuple[Engine, CountingTools, list[tuple[str, str, bool]]]) -> None:
    engine, tools, seen = setup
    first = await run(engine, event(1))
    assert (await requests(server), tools.calls) == (2, 1)
    second = await run(engine, event(2))
    assert first.run_id != second.run_id
    assert (await requests(server), tools.calls) == (2, 1)  # nothing called again
    assert second.output == first.output == "Contoso Ltd: high"
    assert second.context["fit"] == first.context["fit"]
    assert second.step_usage["fit"].input_tokens == 0
    assert second.step_usage["fit"].cost_usd == 0
    assert second.step_usage["fit"].steps == 1
    assert first.step_usage["fit"].input_tokens > 0
    assert seen == [("fit_check", "fit", False), ("fit_check", "fit", True)]


async def test_another_tenant_or_input_is_a_miss(
        server: ModelServerHandle,
        setup: tuple[Engine, CountingTools, list[tuple[str, str, bool]]]) -> None:
    engine, tools, seen = setup
    await run(engine, event(1))
    other_tenant = await run(engine, event(2, tenant="globex"))
    other_input = await run(engine, event(3, domain="litware.com"))
    assert other_input.output == "Litware Inc: high"
    assert other_tenant.step_usage["fit"].input_tokens > 0
    assert (await requests(server), tools.calls) == (6, 3)
    assert [hit for _, _, hit in seen] == [False, False, False]


async def test_an_entry_expires_after_its_ttl(
        server: ModelServerHandle, clock: Clock,
        setup: tuple[Engine, CountingTools, list[tuple[str, str, bool]]]) -> None:
    engine, tools, seen = setup
    await run(engine, event(1))
    clock.now += 59
    await run(engine, event(2))
    assert tools.calls == 1
    clock.now += 2  # 61 s after the first run stored it
    await run(engine, event(3))
    assert (await requests(server), tools.calls) == (4, 2)
    assert [hit for _, _, hit in seen] == [False, True, False]


async def test_a_step_without_cache_is_never_looked_up(server: ModelServerHandle,
                                                       tmp_path: Path) -> None:
    tools = CountingTools()
    engine = make_engine(server, tmp_path / "wf", tools)
    engine.cache = MemoryStepCache()
    seen: list[bool] = []
    engine.on_cache = lambda wf, step, hit: seen.append(hit)
    try:
        await run(engine, event(1))
        await run(engine, event(2))
    finally:
        assert engine.models is not None
        await engine.models.close()
    assert (tools.calls, seen) == (2, [])


def test_the_key_ignores_the_run_identity_but_not_the_tenant() -> None:
    base = StepMessage(run_id="00000000-0000-0000-0000-000000000001", workflow="w",
                       workflow_version=1, step="s", tenant="acme", idempotency_key="k",
                       input={"a": 1}, context={}, event_id="e1", source="crm",
                       event_type="lead.created", started_at="2026-01-01T00:00:00Z",
                       trace_parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    again = base.model_copy(update={"run_id": "00000000-0000-0000-0000-000000000002",
                                    "event_id": "e2", "attempt": 3})
    assert cache_key(base) == cache_key(again)
    assert cache_key(base) != cache_key(base.model_copy(update={"tenant": "globex"}))
    assert cache_key(base) != cache_key(base.model_copy(update={"context": {"x": 1}}))


def test_ttl_must_be_positive() -> None:
    doc = workflow({"ttl_s": 0})
    with pytest.raises(WorkflowError, match=r"cache\.ttl_s"):
        parse_workflow(doc, "fit_check.yaml")


async def test_a_recorded_hit_still_replays(
        server: ModelServerHandle,
        setup: tuple[Engine, CountingTools, list[tuple[str, str, bool]]]) -> None:
    engine, _, _ = setup
    engine.record_all = True
    await run(engine, event(1))
    [message] = engine.start(event(2))
    hit = await engine.run_step(message)
    assert hit.recording is not None
    assert [e["kind"] for e in hit.recording.interactions] == ["model", "tool", "model"]
    again = await engine.run_step(message, replay=hit.recording.interactions)
    assert again.output == hit.output
