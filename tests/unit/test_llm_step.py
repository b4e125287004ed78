"""The llm step through the real openai client against the local model server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agentfabric.errors import PermanentError, TransientError
from agents.engine import Engine
from agents.loader import load_workflows
from agents.model_script import ModelScript
from agents.model_server import ModelServerHandle, serve
from agents.models import ModelClient, ModelRegistry
from schemas.models import HandOff, RunResult, StepMessage, TriggerEvent
from schemas.serde import unseal
from tests.faketools import sample_tools

pytestmark = pytest.mark.timeout(60)

PRICE_IN, PRICE_OUT = 2.5, 10.0  # USD per million tokens

WORKFLOW = {
    "name": "fit_check", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [{
        "id": "fit", "kind": "llm", "model": "local-test",
        "system_file": "prompts/fit.system.md", "prompt_file": "prompts/fit.user.md",
        "tools": ["crm.get_account"], "max_iterations": 5, "max_output_retries": 2,
        "output_schema": {
            "type": "object", "required": ["fit", "reason"], "additionalProperties": False,
            "properties": {"fit": {"enum": ["high", "medium", "low"]},
                           "reason": {"type": "string"}}},
    }],
}
FINAL = {"content": '{"fit": "high", "reason": "{{ tool_results[-1].name if tool_results '
                      'else \'the account\' }} is large"}'}


def lookup(domain: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "crm.get_account", "arguments": {"domain": domain}}]}


@pytest.fixture
async def server() -> AsyncIterator[ModelServerHandle]:
    handle = await serve(ModelScript.parse({"rules": []}), port=0)
    try:
        yield handle
    finally:
        await handle.close()


async def use_script(server: ModelServerHandle, turns: list[dict[str, Any]],
                     faults: list[dict[str, Any]] | None = None,
                     repeat_last: bool = True) -> None:
    script = {"rules": [{"match": {"workflow": "fit_check", "step": "fit"}, "turns": turns,
                         "faults": faults or [], "repeat_last": repeat_last}]}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"http://127.0.0.1:{server.port}/_script",
                                   content=json.dumps(script))
        assert response.status_code == 200, response.text


async def server_log(server: ModelServerHandle) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{server.port}/_requests")
        return list(response.json())


@pytest.fixture
async def engine(server: ModelServerHandle, tmp_path: Path) -> AsyncIterator[Engine]:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "fit.system.md").write_text("You score B2B leads. Use the tools.")
    (tmp_path / "prompts" / "fit.user.md").write_text(
        '{"domain": "{{ input.domain }}", "title": "{{ input.title }}"}')
    (tmp_path / "fit_check.yaml").write_text(yaml.safe_dump(WORKFLOW))
    registry = ModelRegistry.model_validate({
        "providers": {"local": {"base_url": server.url}},
        "models": {"local-test": {"provider": "local", "model": "fabric-local-1",
                                  "input_usd_per_mtok": PRICE_IN,
                                  "output_usd_per_mtok": PRICE_OUT}}})
    models = ModelClient(registry, timeout_s=5, max_retries=3)
    try:
        yield Engine(load_workflows(tmp_path), sample_tools(), models=models)
    finally:
        await models.close()


async def run_step(engine: Engine) -> StepMessage | RunResult | HandOff:
    [message] = engine.start(TriggerEvent(
        source="crm", event_type="lead.created",
        payload={"domain": "contoso.com", "title": "VP Sales"}))
    return await engine.advance(message)


async def test_three_tool_calls_then_an_answer(server: ModelServerHandle,
                                               engine: Engine) -> None:
    await use_script(server, [lookup("{{ user_json.domain }}"), lookup("fabrikam.io"),
                              lookup("litware.com"), FINAL])
    result = await run_step(engine)
    assert isinstance(result, RunResult)
    assert result.output == {"fit": "high", "reason": "Litware Inc is large"}
    assert result.usage.tool_calls == 3
    assert [r["turn"] for r in await server_log(server)] == [0, 1, 2, 3]


async def test_tokens_and_cost_match_the_server_usage(server: ModelServerHandle,
                                                      engine: Engine) -> None:
    await use_script(server, [lookup("contoso.com"), FINAL])
    result = await run_step(engine)
    assert isinstance(result, RunResult)
    log = await server_log(server)
    prompt = sum(r["prompt_tokens"] for r in log)
    completion = sum(r["completion_tokens"] for r in log)
    assert prompt > 0
    assert completion > 0
    assert result.usage.input_tokens == prompt
    assert result.usage.output_tokens == completion
    assert result.usage.cost_usd == pytest.approx(
        (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6, rel=1e-9)
    assert result.step_usage["fit"].input_tokens == prompt


async def test_invalid_structured_output_is_corrected_on_the_second_try(
        server: ModelServerHandle, engine: Engine) -> None:
    await use_script(server, [{"content": '{"fit": "enormous", "reason": "x"}'}, FINAL])
    result = await run_step(engine)
    assert isinstance(result, RunResult)
    assert result.output["fit"] == "high"
    assert len(await server_log(server)) == 2


async def test_output_that_never_fits_is_a_permanent_failure(
        server: ModelServerHandle, engine: Engine) -> None:
    await use_script(server, [{"content": "not json at all"}])
    with pytest.raises(PermanentError, match="does not match the step's schema 3 times "
                                             r"\(it is not JSON"):
        await run_step(engine)


async def test_a_model_that_never_stops_calling_tools_is_handed_off(
        server: ModelServerHandle, engine: Engine) -> None:
    await use_script(server, [lookup("contoso.com")])  # repeated for ever
    result = await run_step(engine)
    assert isinstance(result, HandOff)
    assert "after 5 iterations (max_iterations)" in result.reason
    assert len(await server_log(server)) == 5
    resumable = unseal(result.envelope, result.envelope_schema, StepMessage)
    assert resumable.step == "fit"
    assert resumable.usage.tool_calls == 5
    assert sum(1 for m in result.transcript if m["role"] == "tool") == 5


async def test_429_with_retry_after_is_retried_after_about_a_second(
        server: ModelServerHandle, engine: Engine) -> None:
    await use_script(server, [FINAL], faults=[{"status": 429, "retry_after": 1, "times": 1}])
    result = await run_step(engine)
    assert isinstance(result, RunResult)
    first, second = await server_log(server)
    assert first["status"] == 429
    assert second["status"] == 200
    waited = second["received_at"] - first["received_at"]
    assert 0.9 <= waited < 1.8, waited


async def test_server_errors_retry_then_become_transient(server: ModelServerHandle,
                                                         engine: Engine) -> None:
    await use_script(server, [FINAL], faults=[{"status": 500, "times": 10}])
    assert engine.models is not None
    engine.models.max_retries = 1
    with pytest.raises(TransientError, match=r"model 'local-test' failed 2 times \(HTTP 500"):
        await run_step(engine)


async def test_a_recorded_run_replays_to_byte_identical_outputs(
        server: ModelServerHandle, engine: Engine) -> None:
    from agents.replay import replay_run

    await use_script(server, [lookup("contoso.com"), lookup("litware.com"), FINAL])
    engine.record_all = True
    [message] = engine.start(TriggerEvent(
        source="crm", event_type="lead.created",
        payload={"domain": "contoso.com", "title": "VP Sales"}))
    run = await engine.run_step(message)
    assert run.recording is not None
    assert [e["kind"] for e in run.recording.interactions] == [
        "model", "tool", "model", "tool", "model"]
    # the model now answers differently, then disappears: the replay needs neither
    await use_script(server, [{"content": '{"fit": "low", "reason": "changed"}'}])
    await server.close()
    [step] = await replay_run(engine, [run.recording])
    assert step.identical
    assert step.replayed == '{"fit":"high","reason":"Litware Inc is large"}'


async def test_a_replay_that_takes_another_path_is_reported(
        server: ModelServerHandle, engine: Engine) -> None:
    from agents.recording import ReplayDivergence
    from agents.replay import replay_run

    await use_script(server, [lookup("contoso.com"), FINAL])
    engine.record_all = True
    [message] = engine.start(TriggerEvent(source="crm", event_type="lead.created",
                                          payload={"domain": "contoso.com", "title": "x"}))
    run = await engine.run_step(message)
    assert run.recording is not None
    tampered = run.recording.model_copy(update={"interactions": run.recording.interactions[:1]})
    with pytest.raises(ReplayDivergence, match=r"made call 2 .*the recording has only 1"):
        await replay_run(engine, [tampered])


async def test_408_is_retried_and_x_should_retry_false_is_not(server: ModelServerHandle,
                                                              engine: Engine) -> None:
    await use_script(server, [FINAL], faults=[{"status": 408, "times": 1}])
    result = await run_step(engine)
    assert isinstance(result, RunResult)
    assert [r["status"] for r in await server_log(server)][-2:] == [408, 200]
    await use_script(server, [FINAL], faults=[{"status": 400, "times": 1}])
    with pytest.raises(PermanentError, match="rejected the request"):
        await run_step(engine)
