"""Pydantic twins of the Avro schemas in ``schemas/avro``: the boundary models of every topic.

Each model names its Avro schema (``avro_name``) and converts to and from the Avro
record: JSON-valued fields travel as JSON text, step outputs as a map of JSON texts.
A test checks that each twin has exactly the fields of the latest schema version.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentfabric.errors import MessageValidationError

__all__ = [
    "ApprovalDecision",
    "AvroModel",
    "DeadLetter",
    "Frame",
    "HandOff",
    "Header",
    "ParentCall",
    "RunEvent",
    "RunResult",
    "StepMessage",
    "StepRecording",
    "TriggerEvent",
    "Usage",
    "canonical_json",
    "utc_now",
]

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
EVENT_TYPE_PATTERN = r"^[A-Za-z][A-Za-z0-9_.:-]{0,127}$"


def utc_now() -> datetime:
    """Now, in UTC, at the millisecond precision Avro keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the same value always gives the same text."""
    return _dumps(value, sort_keys=True)


def _json_text(value: Any) -> str:
    """Compact JSON keeping key order (workflows declare their output's order)."""
    return _dumps(value, sort_keys=False)


def _dumps(value: Any, *, sort_keys: bool) -> str:
    try:
        return json.dumps(value, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False)
    except RecursionError as exc:  # a payload or output hundreds of levels deep
        raise MessageValidationError(
            "a JSON value is nested too deeply to write (past Python's recursion limit);"
            " make the event or the step's output flatter"
        ) from exc


class AvroModel(BaseModel):
    """A model that travels on a topic as an Avro record of the schema ``avro_name``."""

    model_config = ConfigDict(extra="forbid")
    avro_name: ClassVar[str]
    json_fields: ClassVar[frozenset[str]] = frozenset()
    json_map_fields: ClassVar[frozenset[str]] = frozenset()

    def to_avro(self) -> dict[str, Any]:
        record = self.model_dump(mode="python")
        for name in self.json_fields:
            record[name] = _json_text(record[name])
        for name in self.json_map_fields:
            record[name] = {k: _json_text(v) for k, v in record[name].items()}
        return record

    @classmethod
    def from_avro(cls, record: dict[str, Any]) -> Self:
        data = dict(record)
        for name in cls.json_fields:
            if isinstance(data.get(name), str):
                data[name] = json.loads(data[name])
        for name in cls.json_map_fields:
            if isinstance(data.get(name), dict):
                data[name] = {k: json.loads(v) for k, v in data[name].items()}
        return cls.model_validate(data)


class Usage(BaseModel):
    """What a run has consumed so far."""

    model_config = ConfigDict(extra="forbid")
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
    steps: int = Field(default=0, ge=0)
    tool_calls: int = Field(default=0, ge=0)

    def __add__(self, other: Usage) -> Usage:
        return Usage(input_tokens=self.input_tokens + other.input_tokens,
                     output_tokens=self.output_tokens + other.output_tokens,
                     cost_usd=round(self.cost_usd + other.cost_usd, 10),
                     steps=self.steps + other.steps,
                     tool_calls=self.tool_calls + other.tool_calls)


class TriggerEvent(AvroModel):
    """A business event; ``event_id`` defaults to a hash of the content so redeliveries dedupe."""

    avro_name: ClassVar[str] = "trigger_event"
    json_fields: ClassVar[frozenset[str]] = frozenset({"payload"})

    event_id: str = Field(min_length=1, max_length=200)
    source: str = Field(pattern=NAME_PATTERN)
    event_type: str = Field(pattern=EVENT_TYPE_PATTERN)
    tenant: str = Field(default="default", pattern=NAME_PATTERN)
    occurred_at: datetime = Field(default_factory=utc_now)
    workflow: str | None = Field(default=None, pattern=NAME_PATTERN)
    payload: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _content_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("event_id"):
            basis = {k: data.get(k) for k in ("source", "event_type", "tenant", "payload")}
            digest = hashlib.sha256(canonical_json(basis).encode()).hexdigest()[:32]
            data = {**data, "event_id": f"sha256:{digest}"}
        return data


class ParentCall(BaseModel):
    """The caller of a sub-workflow run, resumed with the run's result."""

    model_config = ConfigDict(extra="forbid")
    envelope: bytes
    envelope_schema: str
    step: str


class Frame(BaseModel):
    """One open parallel fan-out on a branch's envelope."""

    model_config = ConfigDict(extra="forbid")
    step: str
    visit: int
    branch: str
    total: int = Field(ge=1)
    join: str


class StepMessage(AvroModel):
    """The run envelope: everything a stateless step worker needs to run one step."""

    avro_name: ClassVar[str] = "step_message"
    json_fields: ClassVar[frozenset[str]] = frozenset({"input"})
    json_map_fields: ClassVar[frozenset[str]] = frozenset({"context"})

    run_id: str
    workflow: str
    workflow_version: int = Field(ge=1)
    step: str
    tenant: str = "default"
    trace_parent: str | None = None
    attempt: int = Field(default=1, ge=1)
    idempotency_key: str
    input: dict[str, Any]
    context: dict[str, Any] = Field(default_factory=dict)
    event_id: str
    source: str
    event_type: str
    started_at: datetime
    deadline: datetime | None = None
    usage: Usage = Field(default_factory=Usage)
    step_usage: dict[str, Usage] = Field(default_factory=dict)
    path: list[str] = Field(default_factory=list)
    parent: ParentCall | None = None
    frames: list[Frame] = Field(default_factory=list)
    degraded: list[str] = Field(default_factory=list)


class RunResult(AvroModel):
    """A finished run, on the workflow's result topic."""

    avro_name: ClassVar[str] = "run_result"
    json_fields: ClassVar[frozenset[str]] = frozenset({"output"})
    json_map_fields: ClassVar[frozenset[str]] = frozenset({"context"})

    run_id: str
    workflow: str
    workflow_version: int
    tenant: str = "default"
    status: str = "completed"
    output: Any
    context: dict[str, Any] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    step_usage: dict[str, Usage] = Field(default_factory=dict)
    path: list[str] = Field(default_factory=list)
    event_id: str
    source: str
    event_type: str
    trace_parent: str | None = None
    started_at: datetime
    finished_at: datetime
    degraded: list[str] = Field(default_factory=list)


class RunEvent(AvroModel):
    """One processed step of a run, on the run-events topic: timing and what it consumed
    (the step's share of the run's usage). ``outcome``: next, result, retry, dead_letter or
    hand_off; ``status``: the run's status when ``outcome`` is result; ``error``: why an
    attempt failed (retry, dead_letter)."""

    avro_name: ClassVar[str] = "run_event"

    run_id: str
    workflow: str
    workflow_version: int
    step: str
    tenant: str = "default"
    idempotency_key: str
    attempt: int = 1
    outcome: str
    started_at: datetime
    finished_at: datetime
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    tool_calls: int = 0
    trace_parent: str | None = None
    status: str | None = None
    error: str | None = None


class HandOff(AvroModel):
    """A run handed to a person, with the envelope that resumes it. ``expires_at``: when an
    unanswered request ends the run as expired; ``tool`` and ``call_key``: the tool call a
    ``tool_approval`` waits on (an approval is granted to that call's idempotency key)."""

    avro_name: ClassVar[str] = "hand_off"
    json_fields: ClassVar[frozenset[str]] = frozenset({"transcript"})

    hand_off_id: str
    kind: str
    reason: str
    run_id: str
    workflow: str
    workflow_version: int
    step: str
    tenant: str = "default"
    envelope: bytes
    envelope_schema: str
    transcript: list[Any] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utc_now)
    expires_at: datetime | None = None
    tool: str | None = None
    call_key: str | None = None


class ApprovalDecision(AvroModel):
    """A decision on a hand-off (or its expiry), with the hand-off it decides: the worker
    resumes the run with it (``agentfabric approvals``)."""

    avro_name: ClassVar[str] = "approval_decision"

    hand_off_id: str
    run_id: str
    workflow: str
    step: str
    kind: str
    tenant: str = "default"
    approved: bool
    expired: bool = False
    by: str
    note: str = ""
    reason: str = ""
    decided_at: datetime = Field(default_factory=utc_now)
    hand_off: bytes
    hand_off_schema: str


class StepRecording(AvroModel):
    """One step of a recorded run: its incoming envelope, its interactions, its output."""

    avro_name: ClassVar[str] = "step_recording"
    json_fields: ClassVar[frozenset[str]] = frozenset({"interactions"})

    run_id: str
    workflow: str
    workflow_version: int
    step: str
    idempotency_key: str
    envelope: bytes
    envelope_schema: str
    interactions: list[dict[str, Any]] = Field(default_factory=list)
    output: str  # canonical JSON text of the output: what replay compares byte for byte
    recorded_at: datetime = Field(default_factory=utc_now)


class Header(BaseModel):
    """One Kafka header of a dead-lettered message."""

    model_config = ConfigDict(extra="forbid")
    key: str
    value: bytes | None = None


class DeadLetter(AvroModel):
    """A message that could not be processed, with its reason and original bytes.

    ``transient``: the failure was transient and its attempts ran out (else retrying could
    not help); ``value_claim``: the claim check holding the full original when ``value`` is
    an excerpt; ``first_failed_at`` / ``failed_at``: the first and the last failure (a
    letter written as v1 reads ``first_failed_at`` as ``failed_at``)."""

    avro_name: ClassVar[str] = "dead_letter"

    dead_letter_id: str
    reason: str
    error_type: str
    transient: bool = False
    topic: str
    partition: int
    offset: int
    record_timestamp: datetime | None = None
    consumer_group: str
    key: bytes | None = None
    value: bytes | None = None
    value_claim: str | None = None
    headers: list[Header] = Field(default_factory=list)
    run_id: str | None = None
    workflow: str | None = None
    step: str | None = None
    tenant: str | None = None
    trace_parent: str | None = None
    attempts: int = 1
    first_failed_at: datetime | None = None
    failed_at: datetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _first_failure(self) -> Self:
        if self.first_failed_at is None:
            self.first_failed_at = self.failed_at
        return self
