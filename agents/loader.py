"""Load workflow YAML files into :class:`Workflow` objects, with errors that name the file,
the step and the field.

Checks at load: YAML syntax, the top-level fields, each step against its kind's model,
unique step ids, expressions and templates parse, jump targets exist, and expressions
read only ``input``, ``event``, ``run`` and ``steps.<an existing step>``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentfabric.errors import ExpressionSyntaxError, WorkflowError
from agents.expr import Expression, compile_expression
from agents.template import compile_template

from .budgets import BudgetSpec
from .steps import END, STEP_KINDS, StepSpec
from .workflow import RESERVED_NAMES, SCOPE_NAMES, TriggerSpec, Workflow, WorkflowSet

__all__ = ["load_workflow", "load_workflows", "parse_workflow", "sample_workflows_dir"]

WORKFLOW_NAME = r"^[a-z][a-z0-9_]{0,63}$"


class _WorkflowFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=WORKFLOW_NAME)
    version: int = Field(ge=1)
    description: str = ""
    trigger: TriggerSpec
    steps: list[dict[str, Any]] = Field(min_length=1)
    output: Any = None
    timeout_s: float | None = Field(default=None, gt=0)
    record: bool = Field(default=False, description="Record model and tool interactions so "
                                                    "`agentfabric runs replay` can re-run.")
    input_schema: dict[str, Any] | None = Field(
        default=None, description="JSON schema of the run's input (what the MCP server and "
                                  "clients show); checked to be a valid schema at load.")
    budget: BudgetSpec | None = Field(
        default=None, description="Tokens and model cost one run may use; a run that would "
                                  "pass it ends with status budget_exceeded.")


def sample_workflows_dir() -> Path:
    return Path(str(resources.files("agents").joinpath("workflows")))


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _pydantic_error(exc: ValidationError, file: str, step: str | None = None,
                    prefix: str = "") -> WorkflowError:
    err = exc.errors()[0]
    loc = _loc(tuple(err["loc"]))
    field = ".".join(p for p in (prefix, loc) if p) or None
    message = err["msg"]
    if err["type"] == "missing":
        message = "this field is required"
    elif err["type"] == "extra_forbidden":
        message = "unknown field"
    more = exc.error_count() - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return WorkflowError(message, file=file, step=step, field=field)


def _build_step(raw: Any, index: int, file: str) -> StepSpec:
    if not isinstance(raw, dict):
        raise WorkflowError("a step must be a mapping with id and kind", file=file,
                            field=f"steps[{index}]")
    step_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    label = step_id or f"#{index + 1}"
    kind = raw.get("kind")
    if kind not in STEP_KINDS:
        known = ", ".join(sorted(STEP_KINDS))
        message = (f"unknown step kind '{kind}' (known: {known})" if kind is not None
                   else f"this field is required (one of: {known})")
        raise WorkflowError(message, file=file, step=label, field="kind")
    try:
        step = STEP_KINDS[kind].model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, file, label) from exc
    try:
        step.compile(Path(file).parent)
    except WorkflowError as exc:
        raise WorkflowError(exc.detail, file=file, step=step.id, field=exc.field) from exc
    return step


def _check_references(file: str, step: str | None, field: str, expression: Expression,
                      known_steps: set[str]) -> None:
    for path in expression.references():
        root = path[0]
        if root not in SCOPE_NAMES:
            raise WorkflowError(f"unknown name '{root}' in \"{expression.text}\" (use one of: "
                                f"{', '.join(SCOPE_NAMES)})", file=file, step=step, field=field)
        if root == "steps" and len(path) > 1 and path[1] not in known_steps:
            raise WorkflowError(
                f"\"{expression.text}\" reads steps.{path[1]}, but there is no step "
                f"'{path[1]}' (steps: {', '.join(sorted(known_steps))})",
                file=file, step=step, field=field)


def parse_workflow(data: Any, file: str) -> Workflow:
    """Validate one workflow document (already parsed from YAML)."""
    if not isinstance(data, dict):
        raise WorkflowError("a workflow file must be a mapping with name, version, trigger "
                            "and steps", file=file)
    try:
        doc = _WorkflowFile.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc, file) from exc
    if doc.name in RESERVED_NAMES:
        raise WorkflowError(f"'{doc.name}' is reserved for fabric topics; choose another name",
                            file=file, field="name")
    steps = [_build_step(raw, i, file) for i, raw in enumerate(doc.steps)]
    ids: set[str] = set()
    for step in steps:
        if step.id == END:
            raise WorkflowError("'end' is reserved: it finishes the run", file=file,
                                step=step.id, field="id")
        if step.id in ids:
            raise WorkflowError("this step id is used twice", file=file, step=step.id,
                                field="id")
        ids.add(step.id)
    order = [step.id for step in steps]
    for step in steps:
        try:
            step.check_placement(order)
        except WorkflowError as exc:
            raise WorkflowError(exc.detail, file=file, step=step.id, field=exc.field) from exc
        for field, target in step.targets():
            if target != END and target not in ids:
                raise WorkflowError(f"jumps to '{target}', which is not a step (steps: "
                                    f"{', '.join(s.id for s in steps)}, or 'end')",
                                    file=file, step=step.id, field=field)
        for field, expression in step.expressions():
            _check_references(file, step.id, field, expression, ids)
    try:
        output = None if doc.output is None else compile_template(doc.output)
    except ExpressionSyntaxError as exc:
        raise WorkflowError(str(exc), file=file, field="output") from exc
    try:
        when = None if doc.trigger.when is None else compile_expression(doc.trigger.when)
    except ExpressionSyntaxError as exc:
        raise WorkflowError(str(exc), file=file, field="trigger.when") from exc
    if output is not None:
        for location, expression in output.expressions():
            _check_references(file, None, f"output.{location}".rstrip("."), expression, ids)
    if when is not None:
        _check_references(file, None, "trigger.when", when, set())
    return Workflow(name=doc.name, version=doc.version, description=doc.description,
                    trigger=doc.trigger, steps=steps, file=file, output=output, when=when,
                    timeout_s=doc.timeout_s, record=doc.record,
                    input_schema=_input_schema(doc.input_schema, file), budget=doc.budget)


def _input_schema(schema: dict[str, Any] | None, file: str) -> dict[str, Any] | None:
    if schema is None:
        return None
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise WorkflowError(f"not a valid JSON schema{f' at {where}' if where else ''}: "
                            f"{exc.message}", file=file, field="input_schema") from exc
    if schema.get("type", "object") != "object":
        raise WorkflowError("a workflow's input is a JSON object: use type: object",
                            file=file, field="input_schema")
    return schema


def load_workflow(path: Path) -> Workflow:
    file = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkflowError(f"cannot read the file ({exc.strerror})", file=file) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise WorkflowError(f"invalid YAML{where}: {problem}", file=file) from exc
    return parse_workflow(data, file)


def load_workflows(directory: Path | None = None) -> WorkflowSet:
    """Every ``*.yaml``/``*.yml`` in ``directory`` (default: the shipped samples)."""
    folder = directory or sample_workflows_dir()
    if not folder.is_dir():
        raise WorkflowError("the workflows folder does not exist; set "
                            "AGENTFABRIC_WORKFLOWS_DIR", file=str(folder))
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise WorkflowError("no workflow files (*.yaml) in this folder", file=str(folder))
    seen: dict[tuple[str, int], str] = {}
    workflows = []
    for path in files:
        wf = load_workflow(path)
        key = (wf.name, wf.version)
        if key in seen:
            raise WorkflowError(f"workflow '{wf.name}' version {wf.version} is also defined in "
                                f"{seen[key]}", file=str(path), field="version")
        seen[key] = str(path)
        workflows.append(wf)
    return WorkflowSet(workflows)
