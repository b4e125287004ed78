"""Human approval on the real embedded broker and Redis: an approval step parks a run,
`approvals approve` resumes it to a result, `reject` and expiry end it with the reason on
the result, a decision is refused once one was made, a tool call needing approval runs
once approved, and a decision recorded but not published is published by the sweeper."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from redis.asyncio import Redis

from agentfabric.app import provision, publish_events
from agentfabric.approvals import (
    ApprovalStore,
    DecisionPublisher,
    RedisApprovalGrants,
    decision_for,
    grant_key,
    sweep_once,
)
from agentfabric.approvals_ops import ApprovalRefused, decide, load_requests, select
from agentfabric.errors import ApprovalRequired
from agentfabric.settings import Settings
from agentfabric.worker import Worker, background_worker
from agents.engine import Engine, run_id_for
from agents.loader import load_workflows
from schemas.models import ApprovalDecision, HandOff, RunResult, TriggerEvent, utc_now
from streams.batching import PipelinedRedis
from streams.kafka import Outgoing, Producer
from streams.reader import read_until
from streams.topics import TopicNames
from tests.faketools import sample_tools
from tools.registry import ToolCall, ToolRegistry

from .helpers import collect_results
from .test_cli import cli, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FLOWS = {
    "payout": {"name": "payout", "version": 1,
               "trigger": {"source": "erp", "event_types": ["payout"]},
               "steps": [{"id": "ok", "kind": "approval", "reason": "pay {{ input.amount }}?"},
                         {"id": "pay", "kind": "transform",
                          "output": {"paid": "{{ input.amount }}",
                                     "note": "{{ steps.ok.note }}",
                                     "by": "{{ steps.ok.by }}"}}]},
    "dual": {"name": "dual", "version": 1,
             "trigger": {"source": "erp", "event_types": ["dual"]},
             "steps": [{"id": "fan", "kind": "parallel", "branches": ["legal", "finance"],
                        "join": "both"},
                       {"id": "legal", "kind": "approval", "reason": "legal ok?",
                        "next": "both"},
                       {"id": "finance", "kind": "approval", "reason": "finance ok?",
                        "next": "both"},
                       {"id": "both", "kind": "transform", "output": "go"}]},
    "hurry": {"name": "hurry", "version": 1,
              "trigger": {"source": "erp", "event_types": ["hurry"]},
              "steps": [{"id": "ok", "kind": "approval", "reason": "quick?", "expires_s": 1},
                        {"id": "pay", "kind": "transform", "output": "done"}]},
}
TRANSFER = {"name": "transfer", "version": 1,
            "trigger": {"source": "erp", "event_types": ["transfer"]},
            "steps": [{"id": "send", "kind": "tool", "tool": "ledger.pay",
                       "args": {"amount": "{{ input.amount }}"}},
                      {"id": "receipt", "kind": "transform",
                       "output": {"receipt": "{{ steps.send.paid }}"}}]}


def event(kind: str, n: int, **payload: Any) -> TriggerEvent:
    return TriggerEvent(event_id=f"{kind}-{n}", source="erp", event_type=kind,
                        payload=payload)


def workflows(tmp_path: Path, *docs: dict[str, Any]) -> Path:
    folder = tmp_path / "workflows"
    folder.mkdir()
    for doc in docs:
        (folder / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc))
    return folder


@pytest.fixture
def flow_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"workflows_dir": workflows(tmp_path, *FLOWS.values()),
                                       "approval_sweep_interval_s": 0.2})


@asynccontextmanager
async def worker_for(settings: Settings, engine: Engine) -> AsyncIterator[Worker]:
    await provision(settings, engine)
    async with background_worker(settings, engine) as worker:
        yield worker


async def publish(settings: Settings, *events: TriggerEvent) -> None:
    await publish_events(settings, TopicNames(settings.topic_prefix).trigger("erp"),
                         list(events))


async def hand_offs(settings: Settings, count: int) -> list[HandOff]:
    found = await read_until(settings, TopicNames(settings.topic_prefix).approvals, HandOff,
                             lambda f: len({h.hand_off_id for h in f}) >= count, within=60)
    assert len({h.hand_off_id for h in found}) >= count, f"only {len(found)} hand-offs"
    return found


async def test_approve_resumes_a_parked_run_and_a_second_decision_is_refused(
        flow_settings: Settings) -> None:
    s = flow_settings
    env = settings_env(s)
    first, second = event("payout", 1, amount=900), event("payout", 2, amount=1200)
    runs = [run_id_for(e, "payout") for e in (first, second)]
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    async with worker_for(s, engine):
        await publish(s, first, second)
        parked = await hand_offs(s, 2)
        assert {h.run_id for h in parked} == set(runs)
        assert {h.reason for h in parked} == {"pay 900?", "pay 1200?"}

        listed = await asyncio.to_thread(cli, "approvals", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert {(r["run_id"], r["kind"], r["state"]) for r in rows} == {
            (runs[0], "approval", "pending"), (runs[1], "approval", "pending")}
        assert all(r["expires_at"] for r in rows)

        decided = await decide(s, runs[0], approved=True, by="ann", note="budget ok")
        assert decided.decision.approved
        approved = await asyncio.to_thread(cli, "approvals", "approve", runs[1], "--note",
                                           "fine", "--by", "bob", env=env)
        assert approved.returncode == 0, approved.stderr
        assert f"run {runs[1]}" in approved.stdout

        results = await collect_results(s, "payout", 2)
        by_run = {r.run_id: r for r in results}
        assert by_run[runs[0]].status == "completed"
        assert by_run[runs[0]].output == {"paid": 900, "note": "budget ok", "by": "ann"}
        assert by_run[runs[1]].output == {"paid": 1200, "note": "fine", "by": "bob"}
        assert by_run[runs[1]].context["ok"]["approved"] is True

        with pytest.raises(ApprovalRefused, match="approved by ann"):
            await decide(s, runs[0], approved=False, by="carl", reason="too late")
        again = await asyncio.to_thread(cli, "approvals", "approve", runs[1], env=env)
        assert again.returncode == 1
        assert "approved by bob" in again.stderr
        assert len(await collect_results(s, "payout", 2, within=1)) == 2, "resumed twice"


async def test_reject_ends_the_run_with_the_reason_on_its_result(
        flow_settings: Settings) -> None:
    s = flow_settings
    payout = event("payout", 3, amount=50_000)
    run = run_id_for(payout, "payout")
    env = settings_env(s)
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    async with worker_for(s, engine):
        await publish(s, payout)
        await hand_offs(s, 1)
        missing = await asyncio.to_thread(cli, "approvals", "reject", run, env=env)
        assert missing.returncode == 2, "--reason is required"
        rejected = await asyncio.to_thread(cli, "approvals", "reject", run, "--reason",
                                           "vendor not verified", "--by", "dana", env=env)
        assert rejected.returncode == 0, rejected.stderr
        [result] = await collect_results(s, "payout", 1)
    assert result.status == "rejected"
    assert result.output == {"status": "rejected", "step": "ok",
                             "reason": "vendor not verified", "by": "dana"}
    assert result.context["ok"]["reason"] == "vendor not verified"
    with pytest.raises(ApprovalRefused, match="rejected by dana"):
        await decide(s, run, approved=True, by="ann")


async def test_a_request_nobody_answers_expires_and_cannot_be_approved_after(
        flow_settings: Settings) -> None:
    s = flow_settings
    hurry = event("hurry", 1)
    run = run_id_for(hurry, "hurry")
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    async with worker_for(s, engine):
        await publish(s, hurry)
        [hand_off] = await hand_offs(s, 1)
        assert hand_off.expires_at == hand_off.created_at + timedelta(seconds=1)
        [result] = await collect_results(s, "hurry", 1, within=30)
    assert result.status == "expired"
    assert result.output["status"] == "expired"
    assert result.output["by"] == "expiry"
    assert "nobody approved or rejected step 'ok' within 1s" in result.output["reason"]
    assert result.context["ok"]["expired"] is True
    with pytest.raises(ApprovalRefused, match="expired at"):
        await decide(s, run, approved=True, by="ann")
    everything = await load_requests(s)
    assert [r.state(utc_now()) for r in select(everything, workflow="hurry",
                                               include_decided=True)] == ["expired"]
    assert select(everything, workflow="hurry") == []


async def test_deciding_an_overdue_request_ends_it_as_expired(
        flow_settings: Settings) -> None:
    """No worker runs (nobody sweeps): `approve` finds the request on the topic, sees it
    is past its expiry, and ends it as expired instead."""
    s = flow_settings
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    await provision(s, engine)
    [message] = engine.start(event("hurry", 2))
    [hand_off] = (await engine.run_step(message)).emitted
    assert isinstance(hand_off, HandOff)
    names = TopicNames(s.topic_prefix)
    producer = Producer(s)
    await producer.start()
    try:
        await producer.send_all([Outgoing.of(names.approvals, hand_off.run_id, hand_off)])
    finally:
        await producer.stop()
    later = hand_off.created_at + timedelta(seconds=5)
    with pytest.raises(ApprovalRefused, match="ends as expired"):
        await decide(s, hand_off.run_id, approved=True, by="ann", now=later)
    [published] = await read_until(s, names.decisions, ApprovalDecision, bool, within=30)
    assert (published.hand_off_id, published.expired, published.approved) == (
        hand_off.hand_off_id, True, False)


async def test_concurrent_deciders_one_wins(flow_settings: Settings,
                                            redis_client: Redis) -> None:
    s = flow_settings
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    await provision(s, engine)
    [message] = engine.start(event("payout", 9, amount=10))
    [hand_off] = (await engine.run_step(message)).emitted
    assert isinstance(hand_off, HandOff)
    store = ApprovalStore(PipelinedRedis(redis_client), s.topic_prefix, s.idempotency_ttl_s,
                          s.approval_expiry_s)
    await store.register(hand_off)
    await store.register(hand_off)  # idempotent
    assert await store.for_run(hand_off.run_id) == [hand_off.hand_off_id]
    outcomes = await asyncio.gather(
        *(decide(s, hand_off.run_id, approved=i % 2 == 0, by=f"p{i}", reason="no")
          for i in range(6)), return_exceptions=True)
    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(o, ApprovalRefused) for o in losers), losers
    assert await store.due(utc_now() + timedelta(days=30)) == []
    [published] = await read_until(s, TopicNames(s.topic_prefix).decisions, ApprovalDecision,
                                   bool, within=30)
    assert published.by == winners[0].decision.by


async def test_a_decision_recorded_but_not_published_is_published_by_the_sweeper(
        flow_settings: Settings, redis_client: Redis) -> None:
    """A crash between recording a decision and publishing it loses nothing."""
    s = flow_settings
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    await provision(s, engine)
    [message] = engine.start(event("payout", 10, amount=10))
    [hand_off] = (await engine.run_step(message)).emitted
    assert isinstance(hand_off, HandOff)
    shared = PipelinedRedis(redis_client)
    store = ApprovalStore(shared, s.topic_prefix, s.idempotency_ttl_s, s.approval_expiry_s)
    await store.register(hand_off)
    decision = decision_for(hand_off, approved=True, by="ann")
    assert await store.claim(decision) is None  # recorded; then "the process died"
    publisher = DecisionPublisher(s, shared, "test")
    try:
        assert await sweep_once(store, publisher) == 0  # not yet: it may still be sending
        assert await sweep_once(store, publisher, utc_now() + timedelta(seconds=31)) == 0
    finally:
        await publisher.close()
    [published] = await read_until(s, TopicNames(s.topic_prefix).decisions, ApprovalDecision,
                                   bool, within=30)
    assert published == decision
    assert await store.undelivered(utc_now() + timedelta(days=1)) == []


class PayArgs(BaseModel):
    amount: float


async def test_a_tool_call_needing_approval_parks_and_runs_once_approved(
        settings: Settings, tmp_path: Path, redis_client: Redis) -> None:
    s = settings.model_copy(update={"workflows_dir": workflows(tmp_path, TRANSFER)})
    made: list[str] = []
    registry = ToolRegistry()

    @registry.register("ledger.pay", PayArgs, "Pay an amount (above 10,000 with approval).")
    async def pay(args: PayArgs, call: ToolCall) -> dict[str, Any]:
        granted = await redis_client.exists(grant_key(s.topic_prefix, call.idempotency_key))
        if args.amount > 10_000 and not granted:
            raise ApprovalRequired(f"paying {args.amount:g} needs approval", tool="ledger.pay",
                                   call_key=call.idempotency_key, expires_s=300)
        made.append(call.idempotency_key)
        return {"paid": args.amount}

    engine = Engine(load_workflows(s.workflows_dir), registry)
    big, small = event("transfer", 1, amount=25_000), event("transfer", 2, amount=20)
    run = run_id_for(big, "transfer")
    async with worker_for(s, engine):
        await publish(s, big, small)
        [done] = await collect_results(s, "transfer", 1)
        assert done.output == {"receipt": 20}
        [hand_off] = await hand_offs(s, 1)
        assert (hand_off.kind, hand_off.tool, hand_off.run_id) == ("tool_approval",
                                                                   "ledger.pay", run)
        assert hand_off.reason == "paying 25000 needs approval"
        [pending] = select(await load_requests(s), workflow="transfer")
        assert pending.hand_off.call_key == hand_off.call_key
        await decide(s, run, approved=True, by="ann", note="known vendor")
        results = await collect_results(s, "transfer", 2)
    [result] = [r for r in results if r.run_id == run]
    assert isinstance(result, RunResult)
    assert (result.status, result.output) == ("completed", {"receipt": 25_000})
    assert made.count(hand_off.call_key or "") == 1
    assert len(made) == 2
    grant = await redis_client.get(grant_key(s.topic_prefix, hand_off.call_key or ""))
    assert grant is not None
    assert json.loads(grant)["by"] == "ann"
    grants = RedisApprovalGrants(redis_client, s.topic_prefix)
    assert await grants.granted(hand_off.call_key or "")
    assert not await grants.granted(f"{hand_off.call_key}:other")


async def test_a_run_waiting_on_two_requests_is_decided_by_hand_off_id(
        flow_settings: Settings, redis_client: Redis) -> None:
    s = flow_settings
    engine = Engine(load_workflows(s.workflows_dir), sample_tools())
    await provision(s, engine)
    [message] = engine.start(event("dual", 1))
    store = ApprovalStore(PipelinedRedis(redis_client), s.topic_prefix, s.idempotency_ttl_s,
                          s.approval_expiry_s)
    parked = []
    for branch in (await engine.run_step(message)).emitted:
        [hand_off] = (await engine.run_step(branch)).emitted  # type: ignore[arg-type]
        assert isinstance(hand_off, HandOff)
        await store.register(hand_off)
        parked.append(hand_off)
    with pytest.raises(ApprovalRefused, match="has 2 pending requests"):
        await decide(s, message.run_id, approved=True, by="ann")
    legal = next(h for h in parked if h.step == "legal")
    decided = await decide(s, legal.hand_off_id[:8], approved=True, by="ann")
    assert decided.hand_off == legal
    other = await decide(s, message.run_id, approved=False, by="bob", reason="no budget")
    assert other.hand_off.step == "finance"
