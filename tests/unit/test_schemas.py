"""Avro contracts: twins match the schemas, round trips, and evolution across versions."""

from __future__ import annotations

import io
import re
from datetime import timedelta
from typing import Any

import fastavro
import pytest

from agentfabric.errors import DecodeError, MessageValidationError
from schemas.models import (
    AvroModel,
    DeadLetter,
    HandOff,
    Header,
    RunEvent,
    RunResult,
    StepMessage,
    TriggerEvent,
    Usage,
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

NOW = utc_now()
STEP = StepMessage(
    run_id="r1", workflow="lead_enrichment", workflow_version=1, step="enrich", tenant="acme",
    trace_parent="00-" + "a" * 32 + "-" + "b" * 16 + "-01", attempt=2,
    idempotency_key="r1:enrich:1", input={"email": "x@y.com", "n": [1, 2.5, None]},
    context={"normalise": {"domain": "y.com"}}, event_id="e1", source="crm",
    event_type="lead.created", started_at=NOW, deadline=NOW + timedelta(minutes=5),
    usage=Usage(input_tokens=10, output_tokens=5, cost_usd=0.0012, steps=1, tool_calls=1),
    step_usage={"normalise": Usage(steps=1)}, path=["normalise"])
STEP_ENVELOPE, STEP_SCHEMA = seal(STEP)
SAMPLES: list[AvroModel] = [
    TriggerEvent(event_id="e1", source="crm", event_type="lead.created", tenant="acme",
                 occurred_at=NOW, payload={"lead_id": "L1", "nested": {"a": [1, "b"]}}),
    STEP,
    RunResult(run_id="r1", workflow="lead_enrichment", workflow_version=1, output={"ok": True},
              context={"a": 1}, usage=Usage(steps=3), path=["a", "b", "c"], event_id="e1",
              source="crm", event_type="lead.created", started_at=NOW, finished_at=NOW),
    DeadLetter(dead_letter_id="d1", reason="it broke; fix it", error_type="TransientError",
               transient=True, topic="af.triggers.crm", partition=1, offset=7,
               record_timestamp=NOW - timedelta(minutes=2), consumer_group="af.router",
               key=b"k", value=b"\x00raw", headers=[Header(key="h", value=b"v")],
               trace_parent="00-" + "a" * 32 + "-" + "b" * 16 + "-01", attempts=3,
               first_failed_at=NOW - timedelta(minutes=1), failed_at=NOW),
    HandOff(hand_off_id="h1", kind="max_iterations", reason="the model kept calling tools",
            run_id="r1", workflow="lead_enrichment", workflow_version=1, step="fit",
            envelope=STEP_ENVELOPE, envelope_schema=STEP_SCHEMA,
            transcript=[{"role": "user", "content": "hi"}], created_at=NOW),
    RunEvent(run_id="r1", workflow="lead_enrichment", workflow_version=1, step="fit",
             tenant="acme", idempotency_key="k1", attempt=1, outcome="next", started_at=NOW,
             finished_at=NOW, latency_ms=12.5, input_tokens=10, output_tokens=5,
             cost_usd=0.00002, tool_calls=1),
]


@pytest.mark.parametrize("model", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(model: AvroModel) -> None:
    value, headers = encode(model)
    version = latest_version(model.avro_name)
    assert dict(headers)[SCHEMA_HEADER] == f"{model.avro_name}.v{version}".encode()
    assert decode(value, headers, type(model)) == model


@pytest.mark.parametrize("model", [TriggerEvent, StepMessage, RunResult, DeadLetter, HandOff,
                                   RunEvent])
def test_pydantic_twin_has_exactly_the_latest_schema_fields(model: type[AvroModel]) -> None:
    schema = schema_versions()[model.avro_name][latest_version(model.avro_name)]
    assert {f["name"] for f in schema["fields"]} == set(model.model_fields)


def _all_old_versions() -> list[tuple[str, int]]:
    return [(name, v) for name, versions in schema_versions().items()
            for v in versions if v != max(versions)]


def test_there_is_a_previous_version_to_test() -> None:
    assert ("step_message", 1) in _all_old_versions()


@pytest.mark.parametrize(("name", "version"), _all_old_versions())
def test_new_fields_have_defaults(name: str, version: int) -> None:
    """Backward compatibility: a field added since ``version`` must have a default."""
    old = {f["name"] for f in schema_versions()[name][version]["fields"]}
    latest = schema_versions()[name][latest_version(name)]
    added = [f for f in latest["fields"] if f["name"] not in old]
    assert all("default" in f for f in added), [f["name"] for f in added if "default" not in f]


def test_message_written_with_step_message_v1_is_read_by_current() -> None:
    v1 = fastavro.parse_schema(schema_versions()["step_message"][1])
    record: dict[str, Any] = {
        "run_id": "r-old", "workflow": "lead_enrichment", "workflow_version": 1,
        "step": "score", "tenant": "acme", "trace_parent": None, "attempt": 1,
        "idempotency_key": "r-old:score:2", "input": '{"email":"a@b.com"}',
        "context": {"normalise": '{"domain":"b.com"}'}, "event_id": "e-old", "source": "crm",
        "event_type": "lead.created", "started_at": NOW}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1, record)
    message = decode(buf.getvalue(), [(SCHEMA_HEADER, b"step_message.v1")], StepMessage)
    assert message.run_id == "r-old"
    assert message.input == {"email": "a@b.com"}
    assert message.context == {"normalise": {"domain": "b.com"}}
    assert message.usage == Usage()  # filled from the v2 defaults
    assert message.path == []
    assert message.deadline is None


def test_event_id_defaults_to_a_content_hash() -> None:
    a = TriggerEvent(source="crm", event_type="lead.created", payload={"x": 1})
    b = TriggerEvent(source="crm", event_type="lead.created", payload={"x": 1})
    c = TriggerEvent(source="crm", event_type="lead.created", payload={"x": 2})
    assert a.event_id == b.event_id != c.event_id
    assert a.event_id.startswith("sha256:")


@pytest.mark.parametrize(("value", "headers", "error", "message"), [
    (b"x", [], DecodeError, "the message has no 'af-schema' header"),
    (b"x", [(SCHEMA_HEADER, b"run_result.v1")], DecodeError,
     "expected a step_message message but its header says 'run_result.v1'"),
    (b"x", [(SCHEMA_HEADER, b"step_message.v9")], DecodeError,
     "schema 'step_message.v9' is not known to this worker (it knows versions [1, 2, 3, 4, 5])"),
    (b"\xff\xff\xff", [(SCHEMA_HEADER, b"step_message.v2")], DecodeError,
     "the bytes are not a valid 'step_message.v2' record"),
    (None, [(SCHEMA_HEADER, b"step_message.v2")], DecodeError, "the message has no value"),
])
def test_decode_errors(value: bytes | None, headers: list[tuple[str, bytes]],
                       error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        decode(value, headers, StepMessage)


def test_record_that_decodes_but_breaks_the_model_is_a_validation_error() -> None:
    schema = fastavro.parse_schema(schema_versions()["step_message"][2])
    record = {**STEP.to_avro(), "workflow_version": 0}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    with pytest.raises(MessageValidationError,
                       match="workflow_version: Input should be greater than or equal to 1"):
        decode(buf.getvalue(), [(SCHEMA_HEADER, b"step_message.v2")], StepMessage)


@pytest.mark.parametrize("model", [STEP, *SAMPLES], ids=lambda m: type(m).__name__)
def test_a_sealed_envelope_unseals_to_the_same_message(model: AvroModel) -> None:
    envelope, schema_id = seal(model)
    assert schema_id == f"{model.avro_name}.v{latest_version(model.avro_name)}"
    assert unseal(envelope, schema_id, type(model)) == model


@pytest.mark.parametrize(("schema_id", "message"), [
    ("run_result.v2", "expected a step_message message but its header says 'run_result.v2'"),
    ("step_message.v99", "schema 'step_message.v99' is not known to this worker"),
    ("step_message", "expected a step_message message but its header says 'step_message'"),
    ("", "expected a step_message message but its header says ''"),
])
def test_unsealing_with_a_wrong_or_unknown_schema_id_is_a_decode_error(
        schema_id: str, message: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(message)):
        unseal(STEP_ENVELOPE, schema_id, StepMessage)
