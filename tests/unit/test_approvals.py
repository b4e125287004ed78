"""Human approval in process: hand-offs that expire, tool calls that park their step until
approved (and then run once), decisions that end runs with their reason, the executors'
lineage, and the Avro contracts of the new fields."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest
import yaml
from aiokafka import ConsumerRecord
from pydantic import BaseModel

from agentfabric.approvals import APPROVAL_HEADER, decision_for, expiry_decision
from agentfabric.errors import ApprovalRequired, TransientError
from agentfabric.executors import DecisionExecutor, StepExecutor
from agentfabric.settings import Settings
from agents.engine import Decision, Engine
from agents.journal import MemoryJournal
from agents.loader import load_workflows, parse_workflow
from agents.model_script import ModelScript
from agents.model_server import ModelServerHandle, serve
from agents.models import ModelClient, ModelRegistry
from agents.workflow import WorkflowSet
from schemas.models import (
    ApprovalDecision,
    AvroModel,
    HandOff,
    RunResult,
    StepMessage,
    TriggerEvent,
    utc_now,
)
from schemas.serde import (
    SCHEMA_HEADER,
    decode,
    encode,
    latest_version,
    schema_versions,
    seal,
    unseal,
)
from streams.codec import REPLAY_HEADER
from streams.executor import Job
from streams.topics import TopicNames
from tools.registry import ToolCall, ToolRegistry

pytestmark = pytest.mark.timeout(60)

NOW = utc_now()
FLOWS = """
- name: payout
  version: 1
  trigger: {source: erp, event_types: [payout]}
  timeout_s: 600
  steps:
    - {id: ok, kind: approval, reason: "pay {{ input.amount }}?", expires_s: 90}
    - {id: pay, kind: transform, output: {paid: "{{ input.amount }}"}}
- name: gated
  version: 1
  trigger: {source: erp, event_types: [gated]}
  steps:
    - {id: ok, kind: approval, reason: "go?", on_reject: sorry}
    - {id: done, kind: transform, output: yes, next: end}
    - {id: sorry, kind: transform, output: "{{ steps.ok }}"}
- name: transfer
  version: 1
  trigger: {source: erp, event_types: [transfer]}
  steps:
    - {id: send, kind: tool, tool: ledger.pay, args: {amount: "{{ input.amount }}"}}
    - {id: receipt, kind: transform, output: {receipt: "{{ steps.send.paid }}"}}
"""


class PayArgs(BaseModel):
    amount: float


class Ledger:
    """A write tool with an approval policy (amounts above 10,000), standing in for the
    gateway: it asks for approval unless the call's idempotency key holds a grant."""

    def __init__(self) -> None:
        self.grants: set[str] = set()
        self.paid: list[tuple[str, float]] = []

    def registry(self) -> ToolRegistry:
        registry = ToolRegistry()

        @registry.register("ledger.pay", PayArgs, "Pay an amount.")
        async def pay(args: PayArgs, call: ToolCall) -> dict[str, Any]:
            if args.amount > 10_000 and call.idempotency_key not in self.grants:
                raise ApprovalRequired(f"paying {args.amount:g} needs approval",
                                       tool="ledger.pay", call_key=call.idempotency_key,
                                       expires_s=120)
            self.paid.append((call.idempotency_key, args.amount))
            return {"paid": args.amount}

        return registry


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(ledger: Ledger, clock: Clock) -> Engine:
    docs = yaml.safe_load(FLOWS)
    return Engine(WorkflowSet(parse_workflow(d, f"{d['name']}.yaml") for d in docs),
                  ledger.registry(), clock=clock)


def start(engine: Engine, event_type: str, **payload: Any) -> StepMessage:
    [message] = engine.start(TriggerEvent(event_id=f"{event_type}-1", source="erp",
                                          event_type=event_type, payload=payload))
    return message


async def park(engine: Engine, message: StepMessage) -> HandOff:
    [parked] = (await engine.run_step(message)).emitted
    assert isinstance(parked, HandOff)
    return parked


# --- contracts ---------------------------------------------------------------------------

def test_a_hand_off_written_as_v1_is_still_read() -> None:
    message = StepMessage(run_id="r", workflow="payout", workflow_version=1, step="ok",
                          idempotency_key="r:ok:0", input={}, event_id="e", source="erp",
                          event_type="payout", started_at=NOW)
    envelope, schema_id = seal(message)
    record = {"hand_off_id": "h", "kind": "approval", "reason": "go?", "run_id": "r",
              "workflow": "payout", "workflow_version": 1, "step": "ok", "tenant": "acme",
              "envelope": envelope, "envelope_schema": schema_id, "transcript": "[]",
              "created_at": NOW}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema_versions()["hand_off"][1]),
                               record)
    old = decode(buf.getvalue(), [(SCHEMA_HEADER, b"hand_off.v1")], HandOff)
    assert (old.hand_off_id, old.expires_at, old.tool, old.call_key) == ("h", None, None, None)
    assert unseal(old.envelope, old.envelope_schema, StepMessage) == message


@pytest.mark.parametrize("model", [HandOff, ApprovalDecision])
def test_the_twins_have_exactly_the_latest_schema_fields(model: type[AvroModel]) -> None:
    schema = schema_versions()[model.avro_name][latest_version(model.avro_name)]
    assert {f["name"] for f in schema["fields"]} == set(model.model_fields)


async def test_a_decision_round_trips_with_its_hand_off(engine: Engine) -> None:
    hand_off = await park(engine, start(engine, "payout", amount=900))
    decision = decision_for(hand_off, approved=True, by="ann", note="fine", now=NOW)
    value, headers = encode(decision)
    again = decode(value, headers, ApprovalDecision)
    assert again == decision
    assert unseal(again.hand_off, again.hand_off_schema, HandOff) == hand_off


# --- the engine --------------------------------------------------------------------------

async def test_an_approval_step_expires_after_its_own_expires_s_or_the_default(
        engine: Engine) -> None:
    hand_off = await park(engine, start(engine, "payout", amount=900))
    assert (hand_off.kind, hand_off.reason) == ("approval", "pay 900?")
    assert hand_off.expires_at == NOW + timedelta(seconds=90)
    engine.approval_expiry_s = 3600
    other = await park(engine, start(engine, "gated"))
    assert other.expires_at == NOW + timedelta(seconds=3600)


async def test_approved_runs_go_on_with_the_decision_in_their_context(
        engine: Engine) -> None:
    hand_off = await park(engine, start(engine, "payout", amount=900))
    [after] = await engine.resume(hand_off, Decision(approved=True, by="ann", comment="ok",
                                                     decided_at=NOW))
    assert isinstance(after, StepMessage)
    assert after.step == "pay"
    assert after.context["ok"] == {"approved": True, "by": "ann", "note": "ok",
                                   "expired": False, "decided_at": NOW.isoformat()}
    result = await engine.advance(after)
    assert isinstance(result, RunResult)
    assert (result.status, result.output) == ("completed", {"paid": 900})


@pytest.mark.parametrize(("decision", "status"), [
    (Decision(approved=False, by="ann", comment="over budget"), "rejected"),
    (Decision(approved=False, by="expiry", comment="nobody decided", expired=True),
     "expired"),
])
async def test_rejected_and_expired_runs_end_with_the_reason_as_output(
        engine: Engine, decision: Decision, status: str) -> None:
    hand_off = await park(engine, start(engine, "payout", amount=900))
    [result] = await engine.resume(hand_off, decision)
    assert isinstance(result, RunResult)
    assert result.status == status
    assert result.output == {"status": status, "step": "ok", "reason": decision.comment,
                             "by": decision.by}
    assert result.context["ok"]["reason"] == decision.comment
    assert result.context["ok"]["expired"] is decision.expired


async def test_an_expired_request_goes_to_on_reject_when_the_step_has_one(
        engine: Engine) -> None:
    hand_off = await park(engine, start(engine, "gated"))
    [after] = await engine.resume(hand_off, Decision(approved=False, by="expiry",
                                                     comment="too late", expired=True))
    assert isinstance(after, StepMessage)
    assert after.step == "sorry"
    result = await engine.advance(after)
    assert isinstance(result, RunResult)
    assert result.output["expired"] is True


async def test_time_spent_waiting_does_not_count_against_the_deadline(
        engine: Engine, clock: Clock) -> None:
    message = start(engine, "payout", amount=900)
    assert message.deadline == NOW + timedelta(seconds=600)
    hand_off = await park(engine, message)
    clock.now = NOW + timedelta(hours=5)  # decided long after the deadline would have passed
    [after] = await engine.resume(hand_off, Decision(approved=True, by="ann",
                                                     decided_at=clock.now))
    assert isinstance(after, StepMessage)
    assert after.deadline == NOW + timedelta(hours=5, seconds=600)
    result = await engine.advance(after)
    assert isinstance(result, RunResult)
    assert result.status == "completed"


async def test_a_tool_call_needing_approval_parks_its_step_and_runs_once_approved(
        engine: Engine, ledger: Ledger) -> None:
    message = start(engine, "transfer", amount=25_000)
    hand_off = await park(engine, message)
    assert (hand_off.kind, hand_off.tool, hand_off.call_key) == (
        "tool_approval", "ledger.pay", message.idempotency_key)
    assert hand_off.reason == "paying 25000 needs approval"
    assert hand_off.expires_at == NOW + timedelta(seconds=120)
    assert unseal(hand_off.envelope, hand_off.envelope_schema, StepMessage) == message
    assert ledger.paid == []

    [again] = await engine.resume(hand_off, Decision(approved=True, by="ann"))
    assert again == message  # the same step, the same keys: the grant fits its call
    ledger.grants.add(hand_off.call_key or "")
    after = await engine.advance(again)
    assert isinstance(after, StepMessage)
    result = await engine.advance(after)
    assert isinstance(result, RunResult)
    assert (result.status, result.output) == ("completed", {"receipt": 25_000})
    assert ledger.paid == [(message.idempotency_key, 25_000)]


async def test_small_amounts_need_no_approval(engine: Engine, ledger: Ledger) -> None:
    message = start(engine, "transfer", amount=50)
    after = await engine.advance(message)
    assert isinstance(after, StepMessage)
    assert ledger.paid == [(message.idempotency_key, 50)]


async def test_a_rejected_tool_call_ends_the_run_and_is_never_made(
        engine: Engine, ledger: Ledger) -> None:
    hand_off = await park(engine, start(engine, "transfer", amount=25_000))
    [result] = await engine.resume(hand_off, Decision(approved=False, by="ann",
                                                      comment="not this vendor"))
    assert isinstance(result, RunResult)
    assert result.status == "rejected"
    assert result.output == {"status": "rejected", "step": "send",
                             "reason": "not this vendor", "by": "ann", "tool": "ledger.pay"}
    assert ledger.paid == []


async def test_asking_again_after_an_approval_is_a_new_request(engine: Engine) -> None:
    message = start(engine, "transfer", amount=25_000)
    first = await park(engine, message)
    [again] = (await engine.run_step(message, approval_of=first.hand_off_id)).emitted
    assert isinstance(again, HandOff)
    assert again.call_key == first.call_key
    assert again.hand_off_id != first.hand_off_id


# --- the executors -----------------------------------------------------------------------

def record(topic: str, model: AvroModel, key: str,
           headers: tuple[tuple[str, bytes], ...] = ()) -> ConsumerRecord[bytes, bytes]:
    value, encoded = encode(model)
    return ConsumerRecord(topic=topic, partition=0, offset=0, timestamp=0, timestamp_type=0,
                          key=key.encode(), value=value, checksum=None,
                          serialized_key_size=len(key), serialized_value_size=len(value),
                          headers=(*encoded, *headers))


async def test_the_decision_executor_runs_an_approved_tool_call_again_under_its_lineage(
        engine: Engine, ledger: Ledger) -> None:
    settings = Settings(topic_prefix="ut")
    names = TopicNames("ut")
    message = start(engine, "transfer", amount=25_000)
    hand_off = await park(engine, message)
    decision = decision_for(hand_off, approved=True, by="ann", now=NOW)
    executor = DecisionExecutor(engine, names, settings)
    job = executor.decode(record(names.decisions, decision, hand_off.run_id))
    assert (job.dedupe_key, job.done_key) == (f"decision:{hand_off.hand_off_id}",) * 2
    assert job.subject == message
    [emit] = await executor.execute(job)
    assert emit.topic == names.step("transfer", "send")
    assert (APPROVAL_HEADER, hand_off.hand_off_id.encode()) in emit.headers

    # the step's executor: a unit of work of its own (the first run completed by parking),
    # kept by a retry
    steps = StepExecutor(engine, names, settings, "transfer", "send")
    assert isinstance(emit.model, StepMessage)
    rerun = steps.decode(record(emit.topic, emit.model, emit.key, emit.headers))
    first = steps.decode(record(emit.topic, message, message.run_id))
    assert rerun.done_key == f"{first.done_key}:approved:{hand_off.hand_off_id}"
    assert rerun.dedupe_key != first.dedupe_key
    assert rerun.approval_of == hand_off.hand_off_id
    retry = steps.retry(rerun, TransientError("the tool timed out"))
    assert retry is not None
    assert (APPROVAL_HEADER, hand_off.hand_off_id.encode()) in retry.headers
    ledger.grants.add(message.idempotency_key)
    [onwards, run_event] = await steps.execute(rerun)
    assert onwards.topic == names.step("transfer", "receipt")
    assert run_event.topic == names.run_events
    assert APPROVAL_HEADER not in dict(onwards.headers)


async def test_an_expired_decision_ends_the_run_through_the_executor(engine: Engine) -> None:
    names = TopicNames("ut")
    hand_off = await park(engine, start(engine, "payout", amount=900))
    assert hand_off.expires_at is not None
    decision = expiry_decision(hand_off, hand_off.expires_at, NOW + timedelta(seconds=91))
    assert decision.expired
    assert not decision.approved
    assert "within 90s" in decision.reason
    executor = DecisionExecutor(engine, names, Settings(topic_prefix="ut"))
    replayed = record(names.decisions, decision, hand_off.run_id, ((REPLAY_HEADER, b"d1"),))
    job = executor.decode(replayed)
    assert job.dedupe_key == f"decision:{hand_off.hand_off_id}:replay:d1"
    [emit] = await executor.execute(job)
    assert emit.topic == names.results("payout")
    assert isinstance(emit.model, RunResult)
    assert emit.model.status == "expired"
    assert emit.model.output["reason"] == decision.reason


def test_a_job_without_lineage_has_none() -> None:
    assert Job(message=TriggerEvent(event_id="e", source="erp", event_type="x", payload={}),
               dedupe_key=None, timeout_s=1).approval_of is None


# --- an llm step: the model is not asked again when its step runs again -------------------

LLM_FLOW = {
    "name": "payer", "version": 1,
    "trigger": {"source": "erp", "event_types": ["invoice"]},
    "steps": [{"id": "decide", "kind": "llm", "model": "local-test", "prompt": "pay it",
               "tools": ["ledger.pay"], "max_iterations": 4}],
}


@pytest.fixture
async def server() -> AsyncIterator[ModelServerHandle]:
    script = ModelScript.parse({"rules": [{"match": {"workflow": "payer"}, "turns": [
        {"tool_calls": [{"name": "ledger.pay", "arguments": {"amount": 25000}}]},
        {"content": "paid"}]}]})
    handle = await serve(script, port=0)
    try:
        yield handle
    finally:
        await handle.close()


async def test_an_llm_step_runs_again_from_its_journal_and_makes_the_approved_call_once(
        server: ModelServerHandle, ledger: Ledger, tmp_path: Path) -> None:
    (tmp_path / "payer.yaml").write_text(yaml.safe_dump(LLM_FLOW))
    registry = ModelRegistry.model_validate({
        "providers": {"local": {"base_url": server.url}},
        "models": {"local-test": {"provider": "local", "model": "fabric-local-1"}}})
    models = ModelClient(registry, timeout_s=5, max_retries=0)
    try:
        engine = Engine(load_workflows(tmp_path), ledger.registry(), models=models)
        engine.journal = MemoryJournal()
        message = start(engine, "invoice")
        hand_off = await park(engine, message)
        assert (hand_off.kind, hand_off.tool) == ("tool_approval", "ledger.pay")
        assert hand_off.call_key is not None
        assert hand_off.call_key.startswith(f"{message.idempotency_key}:tool:ledger.pay:")
        [again] = await engine.resume(hand_off, Decision(approved=True, by="ann"))
        ledger.grants.add(hand_off.call_key)
        result = await engine.advance(again)  # type: ignore[arg-type]
    finally:
        await models.close()
    assert isinstance(result, RunResult)
    assert (result.status, result.output) == ("completed", "paid")
    assert ledger.paid == [(hand_off.call_key, 25_000)]
    async with httpx.AsyncClient() as http:
        log = (await http.get(f"http://127.0.0.1:{server.port}/_requests")).json()
    # turn 0 (the tool call) was answered from the journal the second time
    assert [r["turn"] for r in log] == [0, 1], json.dumps(log)[:500]
