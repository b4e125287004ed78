"""The script of the local model server: deterministic behaviours, validated and compiled once.

A script is YAML (or JSON) with ``default_model``, ``embedding_dim`` and ``rules``. The first
rule whose ``match`` fits a chat request answers it: optional ``faults`` are served to the
rule's first requests, then the turn picked by the number of assistant messages already in the
request is rendered with the project's template language (:mod:`agents.template`). See
:mod:`agents.model_server` for the scope templates see. Every problem in a script raises
:class:`ModelScriptError` (a ``ConfigError``) naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from agentfabric.errors import ConfigError, ExpressionSyntaxError
from agents.template import Template, TemplateSyntaxError, compile_template

__all__ = [
    "DEFAULT_MODEL",
    "FaultSpec",
    "MatchSpec",
    "ModelScript",
    "ModelScriptError",
    "RuleSpec",
    "ToolCallSpec",
    "TurnSpec",
]

DEFAULT_MODEL = "fabric-local-1"


class ModelScriptError(ConfigError):
    """A model-server script is invalid; ``file`` and ``field`` say where."""

    def __init__(self, message: str, *, file: str, field: str | None = None) -> None:
        self.file, self.field, self.detail = file, field, message
        where = f"{file}: field '{field}'" if field else file
        super().__init__(f"{where}: {message}")


def _check_template(value: Any) -> Any:
    """Raise ``ValueError`` (so pydantic names the field) if a template part does not parse."""
    try:
        compile_template(value)
    except TemplateSyntaxError as exc:
        inside = f" (at '{exc.location}')" if exc.location else ""
        raise ValueError(f"template does not parse{inside}: {exc}") from exc
    except ExpressionSyntaxError as exc:  # pragma: no cover - compile_template wraps these
        raise ValueError(f"template does not parse: {exc}") from exc
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MatchSpec(_Spec):
    """Every given key must equal the request's; omitted keys match anything."""

    workflow: str | None = None  # header x-agentfabric-workflow
    step: str | None = None  # header x-agentfabric-step
    model: str | None = None  # the request's "model"
    user_contains: str | None = None  # substring of the user messages' text, joined by "\n"


class FaultSpec(_Spec):
    """Served ``times`` times: an error ``status`` and/or a ``delay_ms`` before answering."""

    status: int | None = Field(default=None, ge=400, le=599)
    retry_after: float | None = Field(default=None, ge=0)  # seconds, sent as Retry-After
    delay_ms: int = Field(default=0, ge=0)
    times: int = Field(default=1, ge=1)
    message: str | None = None

    @model_validator(mode="after")
    def _useful(self) -> FaultSpec:
        if self.status is None and not self.delay_ms:
            raise ValueError("a fault needs a status or a delay_ms")
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after needs a status")
        return self


class ToolCallSpec(_Spec):
    name: str = Field(min_length=1)
    arguments: Any = Field(default_factory=dict)  # any value; templates allowed inside
    _template: Template = PrivateAttr()

    _arguments_parse = field_validator("arguments")(_check_template)

    def model_post_init(self, context: Any, /) -> None:
        self._template = compile_template(self.arguments)

    @property
    def template(self) -> Template:
        return self._template


class TurnSpec(_Spec):
    """One answer: ``content`` (a template; a non-string result is JSON-encoded), tool calls,
    or both."""

    content: Any = None
    tool_calls: list[ToolCallSpec] | None = Field(default=None, min_length=1)
    _template: Template | None = PrivateAttr(default=None)

    _content_parse = field_validator("content")(_check_template)

    @model_validator(mode="after")
    def _answers(self) -> TurnSpec:
        if self.content is None and self.tool_calls is None:
            raise ValueError("a turn needs content or tool_calls")
        return self

    def model_post_init(self, context: Any, /) -> None:
        if self.content is not None:
            self._template = compile_template(self.content)

    @property
    def template(self) -> Template | None:
        return self._template


class RuleSpec(_Spec):
    name: str | None = None
    match: MatchSpec = Field(default_factory=MatchSpec)
    latency_ms: int = Field(default=0, ge=0)
    faults: list[FaultSpec] = Field(default_factory=list)
    turns: list[TurnSpec] = Field(min_length=1)
    repeat_last: bool = True

    def fault_for(self, request_number: int) -> FaultSpec | None:
        """The fault served to the rule's ``request_number``-th request (0-based), if any."""
        for fault in self.faults:
            if request_number < fault.times:
                return fault
            request_number -= fault.times
        return None


class ModelScript(_Spec):
    """A validated model-server script; build it with ``load``, ``loads`` or ``parse``."""

    default_model: str = Field(default=DEFAULT_MODEL, min_length=1)
    embedding_dim: int = Field(default=384, ge=1, le=65536)
    rules: list[RuleSpec] = Field(default_factory=list)
    _source: str = PrivateAttr(default="<inline>")

    @property
    def source(self) -> str:
        """Where the script came from: a file path, or "<inline>"."""
        return self._source

    def model_names(self) -> list[str]:
        """The default model and every model a rule matches on, without repeats."""
        names = [self.default_model, *(r.match.model for r in self.rules if r.match.model)]
        return list(dict.fromkeys(names))

    @classmethod
    def parse(cls, data: Any, source: str = "<inline>") -> ModelScript:
        """Validate already-decoded data; raise ``ModelScriptError`` naming ``source``."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ModelScriptError(
                f"a script is a mapping with 'rules', got {type(data).__name__}", file=source
            )
        try:
            script = cls.model_validate(data)
        except ValidationError as exc:
            raise _script_error(exc, data, source) from None
        script._source = source
        return script

    @classmethod
    def loads(cls, text: str, source: str = "<inline>") -> ModelScript:
        """Parse YAML (JSON is YAML too) text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ModelScriptError(f"not valid YAML{at}: {problem}", file=source) from None
        return cls.parse(data, source)

    @classmethod
    def load(cls, path: str | Path) -> ModelScript:
        """Read and parse a script file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelScriptError(f"cannot read the script: {exc.strerror}", file=str(path)) \
                from None
        return cls.loads(text, str(path))


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _script_error(exc: ValidationError, data: dict[str, Any], source: str) -> ModelScriptError:
    err = exc.errors()[0]
    # drop the model-validator pseudo parts pydantic may add (e.g. function names)
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not p.startswith("function-"))
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "this field is required"
    elif err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] not in ("value_error", "assertion_error") and "input" in err:
        message += f", got {json.dumps(err['input'], default=str)[:80]}"
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules")
        rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        if isinstance(rule, dict) and isinstance(rule.get("name"), str):
            message = f"rule '{rule['name']}': {message}"
    return ModelScriptError(message, file=source, field=_loc(loc) or None)
