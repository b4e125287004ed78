"""llm steps through the real fabric: recorded runs replayed by the CLI, hand-offs on the
approvals topic. The model is the local scripted server, reached by the real openai client."""

from __future__ import annotations

from typing import Any

import pytest

from agentfabric.settings import Settings
from agents.engine import run_id_for
from schemas.models import HandOff, TriggerEvent
from streams.reader import read_until
from streams.topics import TopicNames
from tests.modelfixture import FIT_RULE, fit_check

from .helpers import collect_results, running_worker
from .test_cli import cli, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = {"rules": [
    {"match": {"workflow": "fit_check", "user_contains": "loop.example"},
     "turns": [{"tool_calls": [{"name": "crm.get_account",
                                "arguments": {"domain": "contoso.com"}}]}]},
    FIT_RULE,
]}
WORKFLOW = fit_check(record=True)




def event(domain: str) -> TriggerEvent:
    return TriggerEvent(event_id=f"ev-{domain}", source="crm", event_type="lead.created",
                        payload={"domain": domain})


async def test_recorded_run_replays_byte_identical_through_the_cli(
        llm_settings: Settings) -> None:
    from agentfabric.app import publish_events

    names = TopicNames(llm_settings.topic_prefix)
    async with running_worker(llm_settings):
        await publish_events(llm_settings, names.trigger("crm"),
                             [event("contoso.com"), event("litware.com")])
        results = await collect_results(llm_settings, "fit_check", 2)
    outputs = {r.event_id: r.output for r in results}
    assert outputs == {"ev-contoso.com": "Contoso Ltd: high", "ev-litware.com": "Litware Inc: low"}
    usage = next(r.usage for r in results if r.event_id == "ev-contoso.com")
    assert usage.tool_calls == 1
    assert usage.input_tokens > 0
    assert usage.cost_usd == pytest.approx((usage.input_tokens + 2 * usage.output_tokens) / 1e6)
    env = {**settings_env(llm_settings),
           "AGENTFABRIC_WORKFLOWS_DIR": str(llm_settings.workflows_dir),
           "AGENTFABRIC_MODELS_FILE": str(llm_settings.models_file),
           "AGENTFABRIC_MODEL_MAX_RETRIES": "0"}
    run_id = run_id_for(event("contoso.com"), "fit_check")
    replay = cli("runs", "replay", run_id, env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "2/2 step outputs byte-identical" in replay.stdout
    missing = cli("runs", "replay", "no-such-run", env=env)
    assert missing.returncode == 1
    assert "no recording for this run" in missing.stderr


async def test_a_looping_model_is_handed_off_to_the_approvals_topic(
        llm_settings: Settings) -> None:
    from agentfabric.app import publish_events

    names = TopicNames(llm_settings.topic_prefix)
    async with running_worker(llm_settings):
        await publish_events(llm_settings, names.trigger("crm"), [event("loop.example")])
        found = await read_until(llm_settings, names.approvals, HandOff, bool, within=60)
    [hand_off] = found
    assert hand_off.run_id == run_id_for(event("loop.example"), "fit_check")
    assert hand_off.step == "fit"
    assert "after 3 iterations (max_iterations)" in hand_off.reason
    tool_turns: list[Any] = [m for m in hand_off.transcript if m["role"] == "tool"]
    assert len(tool_turns) == 3
