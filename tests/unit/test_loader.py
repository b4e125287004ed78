"""The workflow loader: what loads, and the exact error for each kind of mistake."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentfabric.errors import ConfigError, WorkflowError
from agents.engine import Engine
from agents.loader import load_workflow, load_workflows, parse_workflow
from tests.faketools import sample_tools

BASE: dict[str, Any] = {
    "name": "demo_flow", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [
        {"id": "first", "kind": "transform", "output": {"x": "{{ input.a + 1 }}"}},
        {"id": "check", "kind": "branch",
         "cases": [{"when": "steps.first.x > 2", "next": "big"}], "default": {"next": "end"}},
        {"id": "big", "kind": "transform", "output": "{{ steps.first.x * 10 }}"},
    ],
}


def doc(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.update(changes)
    return data


def with_step(index: int, **changes: Any) -> dict[str, Any]:
    data = doc()
    data["steps"][index] = {**data["steps"][index], **changes}
    return data


def expect(data: Any, message: str) -> None:
    with pytest.raises(WorkflowError, match=f"^{re.escape(message)}$"):
        parse_workflow(data, "wf.yaml")


def test_sample_workflows_load() -> None:
    workflows = load_workflows()
    assert workflows.names() == ["invoice_triage", "lead_enrichment"]
    assert [s.id for s in workflows.get("lead_enrichment", 1).steps] == [
        "normalise", "enrich", "score", "route"]
    lead = workflows.latest("lead_enrichment")
    assert lead.version == 2
    assert [s.id for s in lead.steps] == [
        "normalise", "enrich", "similar", "fit", "score", "route", "update_crm"]
    assert lead.trigger.source == "crm"
    # every tool, model and knowledge base the samples use is configured
    from agentfabric.app import build_engine
    from agentfabric.settings import Settings

    build_engine(Settings())


def test_valid_document_loads_with_order_and_jumps() -> None:
    wf = parse_workflow(doc(), "wf.yaml")
    assert wf.first_step == "first"
    assert wf.following("first") == "check"
    assert wf.following("big") == "end"


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "wf.yaml: a workflow file must be a mapping with name, version, trigger and steps"),
    (doc(name="Bad Name"),
     "wf.yaml: field 'name': String should match pattern '^[a-z][a-z0-9_]{0,63}$'"),
    ({k: v for k, v in BASE.items() if k != "version"}, "wf.yaml: field 'version': this field "
                                                       "is required"),
    (doc(colour="blue"), "wf.yaml: field 'colour': unknown field"),
    (doc(name="results"), "wf.yaml: field 'name': 'results' is reserved for fabric topics; "
                          "choose another name"),
    (doc(steps=[]), "wf.yaml: field 'steps': List should have at least 1 item after validation, "
                    "not 0"),
    (doc(trigger={"source": "crm", "event_types": ["lead created"]}),
     "wf.yaml: field 'trigger': Value error, event type 'lead created' must match "
     "^[A-Za-z][A-Za-z0-9_.:-]{0,127}$"),
])
def test_document_errors(data: Any, message: str) -> None:
    expect(data, message)


@pytest.mark.parametrize(("data", "message"), [
    (with_step(0, kind="agent"), "wf.yaml: step 'first': field 'kind': unknown step kind "
                                 "'agent' (known: approval, branch, llm, lookup, loop, parallel, "
                                 "tool, transform, workflow)"),
    (with_step(0, kind=None), "wf.yaml: step 'first': field 'kind': this field is required "
                              "(one of: approval, branch, llm, lookup, loop, parallel, "
                              "tool, transform, workflow)"),
    (with_step(0, outptu={}), "wf.yaml: step 'first': field 'outptu': unknown field"),
    (with_step(0, id="First Step"), "wf.yaml: step 'First Step': field 'id': String should "
                                    "match pattern '^[a-z][a-z0-9_]{0,63}$'"),
    (with_step(2, id="first"), "wf.yaml: step 'first': field 'id': this step id is used twice"),
    (with_step(2, id="end"), "wf.yaml: step 'end': field 'id': 'end' is reserved: it "
                             "finishes the run"),
    (with_step(1, cases=[{"when": "true", "next": "nowhere"}]),
     "wf.yaml: step 'check': field 'cases[0].next': jumps to 'nowhere', which is not a step "
     "(steps: first, check, big, or 'end')"),
    (with_step(1, cases=[]), "wf.yaml: step 'check': field 'cases': List should have at least "
                             "1 item after validation, not 0"),
    (with_step(2, output="{{ steps.frist.x }}"),
     "wf.yaml: step 'big': field 'output': \"steps.frist.x\" reads steps.frist, but there is "
     "no step 'frist' (steps: big, check, first)"),
    (with_step(2, output="{{ inptu.a }}"),
     "wf.yaml: step 'big': field 'output': unknown name 'inptu' in \"inptu.a\" (use one of: "
     "input, steps, run, event)"),
    (with_step(0, output={"x": "{{ input.a + }}"}),
     "wf.yaml: step 'first': field 'output.x': expected a value after '+' at column 10 in "
     "\"input.a +\""),
    (with_step(1, cases=[{"when": "steps.first.x >", "next": "big"}]),
     "wf.yaml: step 'check': field 'cases[0].when': expected a value after '>' at column 16 "
     "in \"steps.first.x >\""),
])
def test_step_errors(data: Any, message: str) -> None:
    expect(data, message)


def test_output_and_trigger_expressions_are_checked() -> None:
    expect(doc(output={"y": "{{ steps.nope }}"}),
           "wf.yaml: field 'output.y': \"steps.nope\" reads steps.nope, but there is no step "
           "'nope' (steps: big, check, first)")
    expect(doc(trigger={"source": "crm", "event_types": ["lead.created"], "when": "(("}),
           "wf.yaml: field 'trigger.when': expected a value after '(' at column 3 in \"((\"")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nsteps: [\n  - id: a\n")
    with pytest.raises(WorkflowError, match=re.escape(f"{path}: invalid YAML at line 3")):
        load_workflow(path)


def test_duplicate_workflow_version_across_files(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(yaml.safe_dump(BASE))
    with pytest.raises(WorkflowError, match=re.escape(
            f"{tmp_path / 'b.yaml'}: field 'version': workflow 'demo_flow' version 1 is also "
            f"defined in {tmp_path / 'a.yaml'}")):
        load_workflows(tmp_path)


def test_two_versions_load_and_new_runs_use_the_latest(tmp_path: Path) -> None:
    (tmp_path / "v1.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(doc(version=2)))
    workflows = load_workflows(tmp_path)
    assert workflows.latest("demo_flow").version == 2
    assert workflows.get("demo_flow", 1).version == 1


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="no workflow files"):
        load_workflows(tmp_path)
    with pytest.raises(WorkflowError, match="the workflows folder does not exist"):
        load_workflows(tmp_path / "nope")


def test_unregistered_tool_is_a_config_error_at_start() -> None:
    data = with_step(0, kind="tool", tool="crm.nothing", args={}, output=None)
    del data["steps"][0]["output"]
    from agents.workflow import WorkflowSet

    with pytest.raises(ConfigError, match=re.escape(
            "wf.yaml: step 'first': field 'tool': no tool named 'crm.nothing' is registered")):
        Engine(WorkflowSet([parse_workflow(data, "wf.yaml")]), sample_tools())
