"""loop, parallel, workflow and approval steps, run through the engine in process."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from agentfabric.errors import ConfigError, PermanentError, WorkflowError
from agents.engine import Decision, Emitted, Engine
from agents.loader import parse_workflow
from agents.workflow import WorkflowSet
from schemas.models import HandOff, RunResult, StepMessage, TriggerEvent
from tests.faketools import sample_tools

FLOWS = """
- name: counter
  version: 1
  trigger: {source: crm, event_types: [count]}
  steps:
    - {id: again, kind: loop, body: tick, until: "steps.tick.n >= input.target",
       max_iterations: 5, next: done}
    - id: tick
      kind: transform
      output: {n: "{{ (steps.tick.n if has(steps, 'tick') else 0) + 1 }}"}
      next: again
    - {id: done, kind: transform, output: "{{ steps.tick.n }}"}
- name: research
  version: 1
  trigger: {source: crm, event_types: [research]}
  steps:
    - {id: fan, kind: parallel, branches: [firmo, label], join: combine}
    - {id: firmo, kind: tool, tool: crm.get_account, args: {domain: "{{ input.domain }}"},
       next: combine}
    - {id: label, kind: transform, output: "{{ upper(input.domain) }}", next: shout}
    - {id: shout, kind: transform, output: "{{ steps.label + '!' }}", next: combine}
    - {id: combine, kind: transform,
       output: {name: "{{ steps.firmo.name }}", label: "{{ steps.shout }}"}}
- name: doubler
  version: 1
  trigger: {source: crm, event_types: [double]}
  steps:
    - {id: twice, kind: transform, output: {x: "{{ input.n * 2 }}"}}
- name: caller
  version: 1
  trigger: {source: crm, event_types: [call]}
  steps:
    - {id: sub, kind: workflow, workflow: doubler, input: {n: "{{ input.n + 1 }}"}}
    - {id: use, kind: transform, output: "{{ steps.sub.x }}"}
- name: payout
  version: 1
  trigger: {source: erp, event_types: [payout]}
  steps:
    - {id: ok, kind: approval, reason: "pay {{ input.amount }}?", approvers: [finance]}
    - {id: pay, kind: transform, output: {paid: "{{ input.amount }}"}}
"""


@pytest.fixture
def engine() -> Engine:
    docs = yaml.safe_load(FLOWS)
    return Engine(WorkflowSet(parse_workflow(d, f"{d['name']}.yaml") for d in docs),
                  sample_tools())


def start(engine: Engine, event_type: str, **payload: Any) -> StepMessage:
    source = "erp" if event_type == "payout" else "crm"
    [message] = engine.start(TriggerEvent(source=source, event_type=event_type,
                                          payload=payload))
    return message


async def drain(engine: Engine, first: StepMessage) -> list[Emitted]:
    """Run every emitted step message until none is left; return what is not a step."""
    pending: list[StepMessage] = [first]
    final: list[Emitted] = []
    while pending:
        run = await engine.run_step(pending.pop(0))
        for emitted in run.emitted:
            (pending if isinstance(emitted, StepMessage) else final).append(emitted)
    return final


async def test_loop_repeats_its_body_until_the_condition(engine: Engine) -> None:
    [result] = await drain(engine, start(engine, "count", target=3))
    assert isinstance(result, RunResult)
    assert result.output == 3
    assert result.path == ["again", "tick", "again", "tick", "again", "tick", "again", "done"]
    assert result.context["again"] == {"iterations": 3, "done": True}


async def test_loop_is_bounded(engine: Engine) -> None:
    [result] = await drain(engine, start(engine, "count", target=100))
    assert isinstance(result, RunResult)
    assert result.output == 5
    assert result.context["again"] == {"iterations": 5, "done": False}


def test_loop_without_an_exit_is_rejected_at_load() -> None:
    doc = {"name": "bad", "version": 1, "trigger": {"source": "crm", "event_types": ["x"]},
           "steps": [{"id": "l", "kind": "loop", "body": "b", "until": "true"},
                     {"id": "b", "kind": "transform", "output": 1, "next": "l"}]}
    with pytest.raises(WorkflowError, match=re.escape(
            "bad.yaml: step 'l': field 'next': set next: the step to run when the loop ends")):
        parse_workflow(doc, "bad.yaml")


async def test_parallel_branches_join_once_with_all_outputs(engine: Engine) -> None:
    fanned = (await engine.run_step(start(engine, "research", domain="contoso.com"))).emitted
    assert [m.step for m in fanned if isinstance(m, StepMessage)] == ["firmo", "label"]
    firmo, label = fanned
    assert isinstance(firmo, StepMessage)
    assert isinstance(label, StepMessage)
    assert firmo.idempotency_key != label.idempotency_key
    assert (await engine.run_step(firmo)).emitted == []  # waits for the other branch
    assert (await engine.run_step(firmo)).emitted == []  # a redelivered branch counts once
    [shout] = (await engine.run_step(label)).emitted
    assert isinstance(shout, StepMessage)
    [join] = (await engine.run_step(shout)).emitted
    assert isinstance(join, StepMessage)
    assert join.step == "combine"
    assert join.frames == []
    assert join.path == ["fan", "firmo", "label", "shout"]
    assert join.usage.tool_calls == 1
    [result] = (await engine.run_step(join)).emitted
    assert isinstance(result, RunResult)
    assert result.output == {"name": "Contoso Ltd", "label": "CONTOSO.COM!"}
    assert result.usage.steps == 5


async def test_a_branch_that_ends_without_joining_is_permanent(engine: Engine) -> None:
    broken = yaml.safe_load(FLOWS)[1]
    broken["steps"][3]["next"] = "end"
    engine = Engine(WorkflowSet([parse_workflow(broken, "research.yaml")]), sample_tools())
    [_, label] = (await engine.run_step(start(engine, "research", domain="x.com"))).emitted
    assert isinstance(label, StepMessage)
    [shout] = (await engine.run_step(label)).emitted
    assert isinstance(shout, StepMessage)
    with pytest.raises(PermanentError, match="branch 'label' of parallel step 'fan' reached "
                                             "the end"):
        await engine.run_step(shout)


async def test_sub_workflow_result_resumes_the_caller(engine: Engine) -> None:
    [child] = (await engine.run_step(start(engine, "call", n=4))).emitted
    assert isinstance(child, StepMessage)
    assert child.workflow == "doubler"
    assert child.parent is not None
    assert child.input == {"n": 5}
    child_result, resumed = (await engine.run_step(child)).emitted
    assert isinstance(child_result, RunResult)
    assert child_result.workflow == "doubler"
    assert isinstance(resumed, StepMessage)
    assert resumed.step == "use"
    assert resumed.context["sub"] == {"x": 10}
    [result] = (await engine.run_step(resumed)).emitted
    assert isinstance(result, RunResult)
    assert result.output == 10
    assert result.usage.steps == 3  # the caller's two steps and the child's one


def test_calling_an_unknown_workflow_is_a_config_error() -> None:
    caller = yaml.safe_load(FLOWS)[3]
    with pytest.raises(ConfigError, match="field 'workflow': workflow 'doubler' is not loaded"):
        Engine(WorkflowSet([parse_workflow(caller, "caller.yaml")]), sample_tools())


@pytest.mark.parametrize(("approved", "status", "output"), [
    (True, "completed", {"paid": 900}),
    (False, "rejected", {"status": "rejected", "step": "ok", "reason": "no", "by": "bob"}),
])
async def test_approval_parks_the_run_until_a_decision(engine: Engine, approved: bool,
                                                       status: str, output: Any) -> None:
    [parked] = (await engine.run_step(start(engine, "payout", amount=900))).emitted
    assert isinstance(parked, HandOff)
    assert parked.kind == "approval"
    assert parked.reason == "pay 900?"
    [after] = await engine.resume(parked, Decision(approved=approved, by="bob", comment="no"))
    [result] = await drain(engine, after) if isinstance(after, StepMessage) else [after]
    assert isinstance(result, RunResult)
    assert result.status == status
    assert result.output == output


async def test_a_join_inside_a_loop_sees_each_pass_fresh_outputs() -> None:
    doc = yaml.safe_load("""
name: rounds
version: 1
trigger: {source: crm, event_types: [rounds]}
steps:
  - {id: again, kind: loop, body: fan, until: "steps.again.iterations >= 2",
     max_iterations: 2, next: done}
  - {id: fan, kind: parallel, branches: [a, b], join: both}
  - {id: a, kind: transform, output: "{{ steps.again.iterations * 10 + 1 }}", next: both}
  - {id: b, kind: transform, output: "{{ steps.again.iterations * 10 + 2 }}", next: both}
  - {id: both, kind: transform, output: ["{{ steps.a }}", "{{ steps.b }}"], next: again}
  - {id: done, kind: transform, output: "{{ steps.both }}"}
""")
    engine = Engine(WorkflowSet([parse_workflow(doc, "rounds.yaml")]), sample_tools())
    [message] = engine.start(TriggerEvent(source="crm", event_type="rounds", payload={}))
    pending, joins, result = [message], [], None
    while pending:
        # run branch b before a on every pass: the order must not matter
        pending.sort(key=lambda m: m.step != "b")
        for emitted in (await engine.run_step(pending.pop(0))).emitted:
            if isinstance(emitted, StepMessage):
                pending.append(emitted)
                if emitted.step == "both":
                    joins.append(emitted.context)
            else:
                result = emitted
    assert [(j["a"], j["b"]) for j in joins] == [(1, 2), (11, 12)]
    assert isinstance(result, RunResult)
    assert result.output == [11, 12]
    assert result.step_usage["a"].steps == 2
    assert result.usage.steps == len(result.path) == 12


async def test_a_rejection_inside_a_parallel_branch_does_not_strand_the_join() -> None:
    doc = yaml.safe_load("""
name: gated
version: 1
trigger: {source: crm, event_types: [gated]}
steps:
  - {id: fan, kind: parallel, branches: [ok, other], join: both}
  - {id: ok, kind: approval, reason: "go?", next: both}
  - {id: other, kind: transform, output: 1, next: both}
  - {id: both, kind: transform, output: 2}
""")
    engine = Engine(WorkflowSet([parse_workflow(doc, "gated.yaml")]), sample_tools())
    [message] = engine.start(TriggerEvent(source="crm", event_type="gated", payload={}))
    gate = next(m for m in (await engine.run_step(message)).emitted
                if isinstance(m, StepMessage) and m.step == "ok")
    [parked] = (await engine.run_step(gate)).emitted
    assert isinstance(parked, HandOff)
    with pytest.raises(PermanentError, match="rejected inside branch 'ok' of parallel step "
                                             "'fan'"):
        await engine.resume(parked, Decision(approved=False, by="bob"))
