"""The run ledger: run events computed from a step's messages, folded once into Redis, and
read back as timelines, run lists and usage that add up."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agentfabric.errors import ConfigError
from agentfabric.ledger import RunLedger, parse_since, step_event
from schemas.models import RunEvent, RunResult, StepMessage, Usage

pytestmark = pytest.mark.timeout(30)
NOW = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


def _message(usage: Usage, step: str = "fit") -> StepMessage:
    return StepMessage(run_id="r1", workflow="wf", workflow_version=1, step=step,
                       tenant="acme", idempotency_key=f"k-{step}", input={}, event_id="e1",
                       source="crm", event_type="lead.created", started_at=NOW, usage=usage)


def test_step_event_is_the_step_share_of_the_run_usage() -> None:
    before = Usage(input_tokens=10, output_tokens=5, cost_usd=0.5, steps=1, tool_calls=1)
    after = before + Usage(input_tokens=7, output_tokens=3, cost_usd=0.25, steps=1,
                           tool_calls=2)
    event = step_event(_message(before), [_message(after, "next")], NOW, 12.5)
    assert (event.outcome, event.input_tokens, event.output_tokens, event.tool_calls) == \
        ("next", 7, 3, 2)
    assert event.cost_usd == pytest.approx(0.25)
    assert event.finished_at - event.started_at == timedelta(milliseconds=12.5)
    result = RunResult(run_id="r1", workflow="wf", workflow_version=1, status="rejected",
                       output={}, usage=after, event_id="e1", source="crm",
                       event_type="lead.created", started_at=NOW, finished_at=NOW)
    last = step_event(_message(before), [result], NOW, 1.0)
    assert (last.outcome, last.status, last.input_tokens) == ("result", "rejected", 7)


def _event(run: str, step: str, tokens: int, cost: float, *, minutes: int = 0,
           outcome: str = "next", workflow: str = "wf", tenant: str = "acme") -> RunEvent:
    started = datetime.now(UTC) - timedelta(minutes=minutes)
    return RunEvent(run_id=run, workflow=workflow, workflow_version=1, step=step,
                    tenant=tenant, idempotency_key=f"{run}-{step}", outcome=outcome,
                    status="completed" if outcome == "result" else None, started_at=started,
                    finished_at=started + timedelta(milliseconds=20), latency_ms=20,
                    input_tokens=tokens, output_tokens=tokens // 2, cost_usd=cost,
                    tool_calls=1)


@pytest.fixture
def ledger(redis_client: Any) -> RunLedger:
    return RunLedger(redis_client, f"t{uuid.uuid4().hex[:10]}")


async def test_a_redelivered_event_counts_once(ledger: RunLedger) -> None:
    event = _event("r1", "fit", 100, 0.001)
    assert await ledger.fold(event)
    assert not await ledger.fold(event)
    again = event.model_copy(update={"attempt": 2})  # a retry is a step run of its own
    assert await ledger.fold(again)
    summary = await ledger.summary("r1")
    assert summary is not None
    assert (summary.totals.input_tokens, summary.totals.steps) == (200, 2)
    assert len(await ledger.steps("r1")) == 2


async def test_timelines_runs_and_usage_add_up(ledger: RunLedger) -> None:
    events = [_event("r1", "a", 10, 0.1, minutes=3), _event("r1", "b", 20, 0.2, minutes=2),
              _event("r1", "c", 30, 0.3, minutes=1, outcome="result"),
              _event("r2", "a", 40, 0.4, workflow="other", tenant="globex")]
    for event in reversed(events):  # out of order: the timeline sorts by start
        await ledger.fold(event)
    assert [e.step for e in await ledger.steps("r1")] == ["a", "b", "c"]
    r1 = await ledger.summary("r1")
    assert r1 is not None
    assert r1.status == "completed"
    assert (r1.totals.input_tokens, r1.totals.output_tokens, r1.totals.tool_calls) == \
        (60, 30, 3)
    assert r1.totals.cost_usd == pytest.approx(0.6)
    assert [r.run_id for r in await ledger.runs()] == ["r2", "r1"]
    assert [r.run_id for r in await ledger.runs(workflow="wf", status="completed")] == ["r1"]
    assert [r.run_id for r in await ledger.runs(status="running")] == ["r2"]
    since = parse_since("1h")
    rows, hours = await ledger.usage(since_ms=since)
    assert hours >= 1
    assert {(r.tenant, r.workflow): r.usage.input_tokens for r in rows} == \
        {("acme", "wf"): 60, ("globex", "other"): 40}
    by_step, _ = await ledger.usage(since_ms=since, tenant="acme", by="step")
    assert [(r.step, r.usage.input_tokens) for r in by_step] == [("a", 10), ("b", 20),
                                                                 ("c", 30)]
    assert sum(r.usage.cost_usd for r in by_step) == pytest.approx(0.6)


def test_since_takes_durations_and_times() -> None:
    now = NOW.timestamp()
    assert parse_since("90m", now) == int((now - 5400) * 1000)
    assert parse_since("2026-11-22T08:00", now) == int((now - 5400) * 1000)
    with pytest.raises(ConfigError, match="30m, 1h"):
        parse_since("yesterday", now)
