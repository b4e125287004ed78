"""The JSON schema of a workflow's input: the one the workflow declares (``input_schema``),
else a permissive one derived from what its expressions and templates read.

A derived schema lists every ``input.<field>`` the workflow reads (``input.email``,
``get(input, 'po_number')``) as an optional property of any type and allows other fields,
so it documents the input without refusing anything the workflow would accept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from agents.expr import Expression

from .workflow import Workflow

__all__ = ["input_fields", "input_schema"]

# get(input, 'name') reads a field the workflow treats as optional; references() sees only
# ``input`` there, so the field name is taken from the expression's text
_GET_FIELD = re.compile(r"""\bget\(\s*input\s*,\s*(?:'([^'\\]+)'|"([^"\\]+)")""")


def _expressions(wf: Workflow) -> Iterator[Expression]:
    for step in wf.steps:
        for _, expression in step.expressions():
            yield expression
    if wf.output is not None:
        for _, expression in wf.output.expressions():
            yield expression
    if wf.when is not None:
        yield wf.when


def input_fields(wf: Workflow) -> list[str]:
    """The top-level input fields ``wf``'s expressions read, in first-seen order."""
    found: dict[str, None] = {}
    for expression in _expressions(wf):
        for path in sorted(expression.references()):
            if path[0] == "input" and len(path) > 1:
                found.setdefault(path[1])
        for match in _GET_FIELD.finditer(expression.text):
            found.setdefault(match[1] or match[2])
    return list(found)


def input_schema(wf: Workflow) -> dict[str, Any]:
    """The declared input schema of ``wf``, or one derived from the fields it reads."""
    if wf.input_schema is not None:
        return wf.input_schema
    return {"type": "object",
            "properties": {name: {"description": f"read by the workflow as input.{name}"}
                           for name in input_fields(wf)},
            "additionalProperties": True}
