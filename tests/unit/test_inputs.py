"""A workflow's input schema: declared (checked at load) or derived from what it reads."""

from __future__ import annotations

from typing import Any

import pytest

from agentfabric.errors import WorkflowError
from agentfabric.mcp_server import tool_schema
from agents.inputs import input_fields, input_schema
from agents.loader import load_workflows, parse_workflow


def doc(**extra: Any) -> dict[str, Any]:
    return {"name": "greet", "version": 1, "description": "Say hello.",
            "trigger": {"source": "crm", "event_types": ["lead.created"],
                        "when": "input.kind == 'person'"},
            "steps": [{"id": "hello", "kind": "transform",
                       "output": {"text": "hi {{ input.name.first }}",
                                  "title": "{{ get(input, 'title', '') }}",
                                  "org": '{{ get( input , "org") }}'}}],
            "output": {"who": "{{ input['email'] }}", "said": "{{ steps.hello.text }}"},
            **extra}


def test_fields_come_from_steps_output_and_trigger() -> None:
    wf = parse_workflow(doc(), "greet.yaml")
    assert set(input_fields(wf)) == {"kind", "name", "title", "org", "email"}
    schema = input_schema(wf)
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is True
    assert set(schema["properties"]) == {"kind", "name", "title", "org", "email"}
    assert "required" not in schema


def test_a_declared_schema_wins_and_is_checked() -> None:
    declared = {"type": "object", "required": ["email"],
                "properties": {"email": {"type": "string"}}}
    wf = parse_workflow(doc(input_schema=declared), "greet.yaml")
    assert input_schema(wf) == declared
    with pytest.raises(WorkflowError, match="not a valid JSON schema") as bad:
        parse_workflow(doc(input_schema={"type": "object", "required": "email"}), "greet.yaml")
    assert bad.value.field == "input_schema"
    with pytest.raises(WorkflowError, match="type: object"):
        parse_workflow(doc(input_schema={"type": "array"}), "greet.yaml")


def test_tool_schema_adds_a_tenant_unless_the_input_has_one() -> None:
    wf = parse_workflow(doc(), "greet.yaml")
    assert tool_schema(wf, "acme")["properties"]["tenant"]["default"] == "acme"
    own = {"type": "object", "properties": {"tenant": {"type": "integer"}}}
    wf = parse_workflow(doc(input_schema=own), "greet.yaml")
    assert tool_schema(wf, "acme")["properties"]["tenant"] == {"type": "integer"}
    assert own["properties"] == {"tenant": {"type": "integer"}}  # not modified


def test_the_samples_declare_their_input() -> None:
    for wf in load_workflows():
        schema = input_schema(wf)
        assert wf.input_schema is not None, wf.name
        assert set(input_fields(wf)) <= set(schema["properties"]), wf.name
