"""The engine, in process: both sample workflows, routing, guards, determinism."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentfabric.errors import (
    ExpressionEvalError,
    PermanentError,
    ToolError,
    UnknownStepError,
    UnknownWorkflowError,
    UnroutableEventError,
)
from agents.engine import Engine, run_id_for
from agents.loader import load_workflows, parse_workflow
from agents.workflow import WorkflowSet
from schemas.models import ParentCall, RunResult, StepMessage, TriggerEvent, utc_now
from schemas.serde import seal
from tests.faketools import sample_tools


@pytest.fixture(scope="module")
def engine(rules_workflows: Path) -> Engine:
    return Engine(load_workflows(rules_workflows), sample_tools())


async def run_to_end(engine: Engine, event: TriggerEvent) -> RunResult:
    [message] = engine.start(event)
    for _ in range(50):
        after = await engine.advance(message)
        if isinstance(after, RunResult):
            return after
        message = after
    raise AssertionError("run did not finish")


def lead(**payload: Any) -> TriggerEvent:
    base = {"lead_id": "L1", "email": "a@contoso.com", "first_name": "A", "last_name": "B"}
    return TriggerEvent(source="crm", event_type="lead.created", payload={**base, **payload})


def invoice(**payload: Any) -> TriggerEvent:
    base = {"invoice_id": "I1", "vendor_id": "V-1001", "amount": 100, "currency": "USD",
            "invoice_date": "2026-11-01", "due_date": "2026-12-01", "po_number": "PO-1"}
    return TriggerEvent(source="erp", event_type="invoice.posted", payload={**base, **payload})


@pytest.mark.parametrize(("event", "segment", "score"), [
    (lead(title="VP Sales", requested_demo=True), "hot", 100),
    (lead(email="x@litware.com", title="Engineering Manager"), "warm", 60),
    (lead(email="x@gmail.com", title="Student"), "nurture", 0),
    (lead(email=" X@Munsonspickles.COM ", title="Owner"), "nurture", 15),
])
async def test_lead_enrichment(engine: Engine, event: TriggerEvent, segment: str,
                               score: int) -> None:
    result = await run_to_end(engine, event)
    assert result.output["segment"] == segment
    assert result.output["score"] == score
    assert result.path == ["normalise", "enrich", "score", "route"]
    assert result.usage.tool_calls == 1


@pytest.mark.parametrize(("event", "queue"), [
    (invoice(), "auto-pay"),
    (invoice(amount=60000), "cfo-approval"),
    (invoice(amount=12000), "controller-approval"),
    (invoice(vendor_id="V-1008"), "controller-approval"),
    (invoice(vendor_id="V-1010"), "vendor-compliance"),
    (invoice(vendor_id="V-0000"), "vendor-compliance"),
    (invoice(amount=12000, po_number=None), "ap-exceptions"),
    (invoice(currency="JPY"), "ap-exceptions"),
    (invoice(lines=[{"description": "x", "quantity": 2, "unit_price": 10}]), "ap-exceptions"),
])
async def test_invoice_triage(engine: Engine, event: TriggerEvent, queue: str) -> None:
    result = await run_to_end(engine, event)
    assert result.output["queue"] == queue


async def test_run_ids_are_deterministic(engine: Engine) -> None:
    event = lead()
    [a], [b] = engine.start(event), engine.start(event)
    assert a.run_id == b.run_id == run_id_for(event, "lead_enrichment")
    assert a.idempotency_key == f"{a.run_id}:normalise:0"
    assert a.trace_parent == b.trace_parent
    other = lead(lead_id="L2")
    assert engine.start(other)[0].run_id != a.run_id


def test_routing_errors(engine: Engine) -> None:
    with pytest.raises(UnroutableEventError, match=re.escape(
            "no workflow starts on event type 'lead.deleted' from source 'crm'")):
        engine.start(TriggerEvent(source="crm", event_type="lead.deleted", payload={}))
    with pytest.raises(UnknownWorkflowError, match="workflow 'nope' is not loaded"):
        engine.start(TriggerEvent(source="crm", event_type="lead.created", workflow="nope",
                                  payload={}))
    with pytest.raises(UnroutableEventError, match=re.escape(
            "workflow 'invoice_triage' does not start on lead.created events from crm")):
        engine.start(TriggerEvent(source="crm", event_type="lead.created",
                                  workflow="invoice_triage", payload={}))


async def test_unknown_workflow_version_and_step(engine: Engine) -> None:
    [message] = engine.start(lead())
    with pytest.raises(UnknownWorkflowError, match="version 7 is not loaded"):
        await engine.advance(message.model_copy(update={"workflow_version": 7}))
    with pytest.raises(UnknownStepError, match="has no step 'nope'"):
        await engine.advance(message.model_copy(update={"step": "nope"}))


async def test_expression_failure_on_bad_data_is_permanent(engine: Engine) -> None:
    [message] = engine.start(lead(email=42))
    with pytest.raises(ExpressionEvalError, match="trim"):
        await engine.advance(message)


async def test_tool_argument_failure(engine: Engine) -> None:
    [message] = engine.start(invoice(amount="lots"))
    after = await engine.advance(message)
    assert isinstance(after, StepMessage)
    with pytest.raises(ToolError, match=re.escape(
            "tool 'erp.validate_invoice' rejected its arguments: amount: Input should be a valid "
            "decimal")):
        await engine.advance(after)


async def test_deadline_and_step_limit(engine: Engine) -> None:
    [message] = engine.start(lead())
    late = message.model_copy(update={"deadline": utc_now() - timedelta(seconds=1)})
    with pytest.raises(PermanentError, match="passed its deadline"):
        await engine.advance(late)
    looping = message.model_copy(update={"path": ["normalise"] * 100})
    with pytest.raises(PermanentError, match="has executed 100 steps, the limit"):
        await engine.advance(looping)


async def test_a_loop_stops_at_the_step_limit() -> None:
    loop = yaml.safe_load("""
name: spin
version: 1
trigger: {source: crm, event_types: [spin]}
steps:
  - {id: again, kind: transform, output: 1, next: again}
""")
    engine = Engine(WorkflowSet([parse_workflow(loop, "spin.yaml")]), sample_tools(),
                    max_steps_per_run=5)
    [message] = engine.start(TriggerEvent(source="crm", event_type="spin", payload={}))
    for visit in range(1, 6):
        after = await engine.advance(message)
        assert isinstance(after, StepMessage)
        assert after.idempotency_key == f"{after.run_id}:again:{visit}"
        message = after
    with pytest.raises(PermanentError, match="has executed 5 steps"):
        await engine.advance(message)


async def test_only_effect_free_steps_are_pure() -> None:
    """A transform or branch outside a parallel branch runs without a lease; a tool step, a
    cached step, a step inside a parallel branch (it may join) and every step of a recorded
    workflow take one."""
    flow = yaml.safe_load("""
name: mixed
version: 1
trigger: {source: crm, event_types: [mix]}
steps:
  - {id: shape, kind: transform, output: {domain: "{{ input.domain }}"}}
  - id: pick
    kind: branch
    cases: [{when: "input.domain == 'x'", next: lookup}]
  - {id: lookup, kind: tool, tool: crm.get_account, args: {domain: "{{ input.domain }}"}}
  - {id: fan, kind: parallel, branches: [left, right], join: after}
  - {id: left, kind: transform, output: 1, next: after}
  - {id: right, kind: transform, output: 1, next: after}
  - {id: after, kind: transform, output: 2, cache: {ttl_s: 60}}
""")
    engine = Engine(WorkflowSet([parse_workflow(flow, "mixed.yaml")]), sample_tools())
    [first] = engine.start(TriggerEvent(source="crm", event_type="mix",
                                        payload={"domain": "contoso.com"}))
    at = {step: first.model_copy(update={"step": step})
          for step in ("shape", "pick", "lookup", "fan", "after")}
    assert engine.is_pure(at["shape"])
    assert engine.is_pure(at["pick"])
    assert not engine.is_pure(at["lookup"])
    assert not engine.is_pure(at["fan"])
    assert not engine.is_pure(at["after"]), "a cached step writes the cache"
    branch, _ = (await engine.run_step(at["fan"])).emitted
    assert isinstance(branch, StepMessage)
    assert branch.step == "left"
    assert branch.frames
    assert not engine.is_pure(branch), "a step inside a parallel branch may join"
    assert not engine.is_pure(first.model_copy(update={"workflow": "ghost"}))
    envelope, schema = seal(first)
    called = at["shape"].model_copy(update={"parent": ParentCall(
        envelope=envelope, envelope_schema=schema, step="shape")})
    assert not engine.is_pure(called), "a called workflow's step may return to its caller"
    recorded = parse_workflow({**flow, "record": True}, "mixed.yaml")
    assert not Engine(WorkflowSet([recorded]), sample_tools()).is_pure(at["shape"])
    engine.record_all = True
    assert not engine.is_pure(at["shape"]), "a recorded step writes its recording"
