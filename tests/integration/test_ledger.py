"""The run ledger through the real fabric: a three-step run with an llm step emits one run
event per step, the worker folds them into Redis, and `runs show`, `runs list` and `usage`
(the CLI, as a user runs it) add up to the runs' results."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentfabric.ledger import RunLedger
from agentfabric.settings import Settings
from agents.engine import run_id_for
from schemas.models import RunEvent, TriggerEvent
from streams.reader import read_until
from streams.topics import TopicNames
from tests.modelfixture import FIT_RULE, fit_check, models_file, scripted_server

from .helpers import collect_results, running_worker
from .test_cli import cli, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = {"rules": [FIT_RULE]}
WORKFLOW = fit_check({"id": "shout", "kind": "transform", "output": "{{ steps.label + '!' }}"})
DOMAINS = ("contoso.com", "litware.com")




def event(domain: str) -> TriggerEvent:
    return TriggerEvent(event_id=f"ev-{domain}", source="crm", event_type="lead.created",
                        tenant="acme", payload={"domain": domain})


async def _folded(settings: Settings, run_ids: list[str], steps: int,
                  within_s: float = 30) -> None:
    """Wait until the ledger has folded ``steps`` events of every run (the worker folds
    them after the results are out)."""
    from redis.asyncio import Redis

    redis = Redis.from_url(settings.redis_url)
    ledger = RunLedger(redis, settings.topic_prefix)
    deadline = time.monotonic() + within_s
    try:
        while True:
            found = [await ledger.summary(r) for r in run_ids]
            if all(s is not None and s.totals.steps >= steps for s in found):
                return
            assert time.monotonic() < deadline, f"the ledger folded only {found}"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_runs_show_and_usage_add_up_to_the_results(llm_settings: Settings) -> None:
    from agentfabric.app import publish_events

    names = TopicNames(llm_settings.topic_prefix)
    run_ids = [run_id_for(event(d), "fit_check") for d in DOMAINS]
    async with running_worker(llm_settings):
        await publish_events(llm_settings, names.trigger("crm"), [event(d) for d in DOMAINS])
        results = {r.run_id: r for r in await collect_results(llm_settings, "fit_check", 2)}
        await _folded(llm_settings, run_ids, 3)
    # the topic carries one compact event per processed step
    events = await read_until(llm_settings, names.run_events, RunEvent,
                              lambda found: len(found) >= 6, within=30)
    assert sorted((e.run_id, e.step) for e in events) == sorted(
        (r, s) for r in run_ids for s in ("fit", "label", "shout"))

    env = {**settings_env(llm_settings),
           "AGENTFABRIC_WORKFLOWS_DIR": str(llm_settings.workflows_dir),
           "AGENTFABRIC_MODELS_FILE": str(llm_settings.models_file)}
    for run_id in run_ids:
        result = results[run_id]
        shown = cli("runs", "show", run_id, "--json", env=env)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        timeline = json.loads(shown.stdout)
        steps = timeline["steps"]
        assert [s["step"] for s in steps] == ["fit", "label", "shout"]
        assert [s["outcome"] for s in steps] == ["next", "next", "result"]
        assert timeline["status"] == "completed"
        assert result.usage.input_tokens > 0
        assert result.usage.cost_usd > 0
        assert sum(s["input_tokens"] for s in steps) == result.usage.input_tokens
        assert sum(s["output_tokens"] for s in steps) == result.usage.output_tokens
        assert sum(s["tool_calls"] for s in steps) == result.usage.tool_calls == 1
        assert sum(s["cost_usd"] for s in steps) == pytest.approx(result.usage.cost_usd)
        assert timeline["totals"]["input_tokens"] == result.usage.input_tokens
        assert timeline["totals"]["cost_usd"] == pytest.approx(result.usage.cost_usd)
        # each step's latency is within the run's wall time, and so is their sum
        wall_ms = (result.finished_at - result.started_at).total_seconds() * 1000
        assert all(s["latency_ms"] > 0 for s in steps)
        assert sum(s["latency_ms"] for s in steps) <= wall_ms + 5
        table = cli("runs", "show", run_id, env=env)
        assert table.returncode == 0, table.stderr
        assert "total" in table.stdout
        assert "shout" in table.stdout
        assert f"{result.usage.cost_usd:.6f}" in table.stdout

    listed = cli("runs", "list", "--workflow", "fit_check", "--status", "completed",
                 "--since", "1h", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(line)["run_id"] for line in listed.stdout.splitlines()) == \
        sorted(run_ids)

    for by in ("workflow", "step"):
        used = cli("usage", "--tenant", "acme", "--since", "1h", "--by", by, "--json",
                   env=env)
        assert used.returncode == 0, used.stderr
        report = json.loads(used.stdout)
        rows = report["rows"]
        assert len(rows) == (1 if by == "workflow" else 3)
        assert sum(r["input_tokens"] for r in rows) == sum(
            r.usage.input_tokens for r in results.values())
        assert sum(r["output_tokens"] for r in rows) == sum(
            r.usage.output_tokens for r in results.values())
        assert sum(r["steps"] for r in rows) == 6
        assert report["cost_usd"] == pytest.approx(sum(r.usage.cost_usd
                                                       for r in results.values()))
    other = cli("usage", "--tenant", "nobody", "--json", env=env)
    assert json.loads(other.stdout)["rows"] == []


FLAKY_SCRIPT = {"rules": [
    {"match": {"workflow": "flaky"}, "faults": [{"status": 503, "times": 1}],
     "turns": [{"content": {"ok": True}}]},
]}
FLAKY = {
    "name": "flaky", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [
        {"id": "ask", "kind": "llm", "model": "local", "prompt": "say ok"},
        {"id": "divide", "kind": "transform", "output": "{{ 1 / input.zero }}"},
    ],
}


async def test_failed_attempts_are_in_the_timeline(settings: Settings, tmp_path: Path) -> None:
    """A retried attempt and a dead-lettered one each leave a run event with the error; the
    run's status says it was dead-lettered; failed attempts are not counted as steps."""
    from agentfabric.app import publish_events

    async with scripted_server(FLAKY_SCRIPT) as server:
        workflows = tmp_path / "workflows"
        workflows.mkdir()
        (workflows / "flaky.yaml").write_text(yaml.safe_dump(FLAKY))
        models = models_file(tmp_path, server.url, max_retries=0)
        flaky = settings.model_copy(update={"workflows_dir": workflows, "models_file": models,
                                            "retry_tiers_s": [0.2, 0.5]})
        names = TopicNames(flaky.topic_prefix)
        trigger = TriggerEvent(event_id="ev-flaky", source="crm", event_type="lead.created",
                               tenant="acme", payload={"zero": 0})
        run_id = run_id_for(trigger, "flaky")
        async with running_worker(flaky):
            await publish_events(flaky, names.trigger("crm"), [trigger])
            events = await read_until(flaky, names.run_events, RunEvent,
                                      lambda found: any(e.outcome == "dead_letter"
                                                        for e in found), within=60)
            await _folded(flaky, [run_id], 1)
    assert [(e.step, e.attempt, e.outcome) for e in events] == [
        ("ask", 1, "retry"), ("ask", 2, "next"), ("divide", 1, "dead_letter")]
    retry, _, dead = events
    assert retry.error is not None
    assert "503" in retry.error
    assert dead.error is not None
    assert dead.error.startswith("ExpressionEvalError")
    assert all(e.run_id == run_id for e in events)

    env = {**settings_env(flaky), "AGENTFABRIC_WORKFLOWS_DIR": str(workflows),
           "AGENTFABRIC_MODELS_FILE": str(models)}
    deadline = time.monotonic() + 30
    while True:
        shown = cli("runs", "show", run_id, "--json", env=env)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        timeline = json.loads(shown.stdout)
        if len(timeline["steps"]) == 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert [s["outcome"] for s in timeline["steps"]] == ["retry", "next", "dead_letter"]
    assert timeline["status"] == "dead_letter"
    assert timeline["totals"]["steps"] == 1  # only the attempt that went on counts
    table = cli("runs", "show", run_id, env=env)
    assert table.returncode == 0, table.stderr
    assert "divide attempt 1 (dead_letter): ExpressionEvalError" in table.stdout


async def test_a_replayed_step_counts_after_its_dead_letter(settings: Settings) -> None:
    """A dead-lettered attempt and the replay that completes the run share the step visit's
    key and attempt: both events count, and the run ends completed."""
    from datetime import UTC, datetime

    from redis.asyncio import Redis

    redis = Redis.from_url(settings.redis_url)
    ledger = RunLedger(redis, settings.topic_prefix)
    at = datetime.now(UTC)
    run_id = "11111111-2222-3333-4444-555555555555"
    common: dict[str, Any] = {"run_id": run_id, "workflow": "wf",
              "workflow_version": 1, "step": "last", "tenant": "acme",
              "idempotency_key": "run:last:0", "attempt": 1, "started_at": at,
              "finished_at": at}
    try:
        dead = RunEvent(**common, outcome="dead_letter", error="ToolError: down")
        assert await ledger.fold(dead)
        assert not await ledger.fold(dead), "a redelivered event counts once"
        summary = await ledger.summary(run_id)
        assert summary is not None
        assert summary.status == "dead_letter"
        replayed = RunEvent(**common, outcome="result", status="completed", input_tokens=7)
        assert await ledger.fold(replayed)
        summary = await ledger.summary(run_id)
        assert summary is not None
        assert (summary.status, summary.totals.steps, summary.totals.input_tokens) == (
            "completed", 1, 7)
        assert [e.outcome for e in await ledger.steps(run_id)] == [
            "dead_letter", "result"]
    finally:
        await redis.aclose()
