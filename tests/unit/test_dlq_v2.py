"""Dead letters v2: the builder's fields, v1 letters read as v2, filters, --since, replay plans."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import pytest
from aiokafka import ConsumerRecord

from agentfabric.dlq_ops import (
    DeadLetterFilter,
    Replay,
    Unreplayable,
    parse_since,
    plan_replay,
    select,
    superseded,
)
from agentfabric.errors import (
    ConfigError,
    DecodeError,
    TransientError,
    UnknownWorkflowError,
)
from schemas.models import DeadLetter, Header, StepMessage, utc_now
from schemas.serde import SCHEMA_HEADER, decode, encode, schema_versions
from streams.codec import FIRST_FAILURE_HEADER, REPLAY_HEADER, RETRY_DUE_HEADER
from streams.dlq import dead_letter, from_epoch_ms, replay_of
from streams.topics import TopicNames

NAMES = TopicNames("af")
TRACE = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
NOW = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
MESSAGE = StepMessage(
    run_id="run-1", workflow="lead_enrichment", workflow_version=1, step="enrich",
    tenant="acme", trace_parent=TRACE, attempt=5, idempotency_key="run-1:enrich:0",
    input={"email": "a@b.co"}, event_id="e1", source="crm", event_type="lead.created",
    started_at=NOW - timedelta(hours=2), deadline=NOW - timedelta(hours=1))


def record(topic: str, value: bytes | None, headers: list[tuple[str, bytes]] | None = None,
           timestamp: int = 1_700_000_000_123) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=topic, partition=1, offset=42, timestamp=timestamp,
                          timestamp_type=0, key=b"run-1", value=value, checksum=None,
                          serialized_key_size=5, serialized_value_size=1,
                          headers=tuple(headers or ()))


def built(rec: ConsumerRecord[bytes, bytes], error: Exception,
          message: StepMessage | None = None) -> DeadLetter:
    out = dead_letter(rec, error, group="af.lead_enrichment.enrich", dlq_topic="af.dlq",
                      message=message)
    assert out.topic == "af.dlq"
    return decode(out.value, out.headers, DeadLetter)


# --- the builder ------------------------------------------------------------------------

def test_a_transient_failure_that_ran_out_keeps_its_whole_story() -> None:
    first_ms = int((utc_now() - timedelta(minutes=11)).timestamp() * 1000)
    value, headers = encode(MESSAGE)
    rec = record("af.lead_enrichment.enrich", value,
                 [*headers, ("traceparent", b"00-" + b"c" * 32 + b"-" + b"d" * 16 + b"-01"),
                  (FIRST_FAILURE_HEADER, str(first_ms).encode()),
                  ("Authorization", b"Bearer sk-123")])
    before = utc_now()
    letter = built(rec, TransientError("the CRM is unavailable"), MESSAGE)
    assert letter.transient is True
    assert letter.error_type == "TransientError"
    assert (letter.topic, letter.partition, letter.offset) == ("af.lead_enrichment.enrich", 1, 42)
    assert letter.record_timestamp == datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC)
    assert letter.consumer_group == "af.lead_enrichment.enrich"
    assert (letter.run_id, letter.workflow, letter.step, letter.tenant) == \
        ("run-1", "lead_enrichment", "enrich", "acme")
    assert letter.attempts == 5
    first = from_epoch_ms(first_ms)
    assert first is not None
    assert letter.first_failed_at == first
    assert letter.failed_at >= before > first
    assert letter.trace_parent is not None
    assert "c" * 32 in letter.trace_parent, "the record's traceparent wins over the envelope's"
    assert letter.value == value, "the original bytes stay"
    assert Header(key="Authorization", value=b"[redacted]") in letter.headers


def test_a_permanent_failure_without_headers() -> None:
    letter = built(record("af.triggers.crm", b"\x00junk", timestamp=-1),
                   DecodeError("the value is not JSON; send JSON"))
    assert letter.transient is False
    assert letter.attempts == 1
    assert letter.record_timestamp is None, "Kafka's -1 means no timestamp"
    assert letter.first_failed_at == letter.failed_at
    assert letter.trace_parent is None
    assert letter.run_id is None


def test_the_envelope_gives_the_trace_when_the_record_has_no_header() -> None:
    value, headers = encode(MESSAGE)
    letter = built(record("af.lead_enrichment.enrich", value, headers),
                   DecodeError("x"), MESSAGE)
    assert letter.trace_parent == TRACE


@pytest.mark.parametrize("header", [b"not-a-number", b"99999999999999999999", b"-5"])
def test_a_garbled_first_failure_header_falls_back_to_the_failure_time(header: bytes) -> None:
    letter = built(record("af.triggers.crm", b"{}", [(FIRST_FAILURE_HEADER, header)]),
                   RuntimeError("boom"))
    assert letter.error_type == "InternalError"
    assert letter.transient is False
    assert letter.first_failed_at == letter.failed_at


def test_a_dead_letter_written_as_v1_reads_as_v2() -> None:
    v1 = fastavro.parse_schema(schema_versions()["dead_letter"][1])
    failed = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1, {
        "dead_letter_id": "old-1", "reason": "it broke; replay it", "error_type": "ToolError",
        "topic": "af.invoice_triage.validate", "partition": 0, "offset": 3,
        "consumer_group": "af.invoice_triage.validate", "key": b"r", "value": b"v",
        "headers": [{"key": "af-schema", "value": b"step_message.v4"}], "run_id": "r",
        "workflow": "invoice_triage", "step": "validate", "tenant": "acme", "attempts": 2,
        "failed_at": failed})
    letter = decode(buf.getvalue(), [(SCHEMA_HEADER, b"dead_letter.v1")], DeadLetter)
    assert letter.dead_letter_id == "old-1"
    assert letter.attempts == 2
    assert letter.transient is False
    assert letter.record_timestamp is None
    assert letter.trace_parent is None
    assert letter.failed_at == failed
    assert letter.first_failed_at == failed, "v1 had one failure time"
    assert letter.headers == [Header(key="af-schema", value=b"step_message.v4")]


# --- --since and filters ----------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("10m", NOW - timedelta(minutes=10)), ("2h", NOW - timedelta(hours=2)),
    ("3d", NOW - timedelta(days=3)), ("45s", NOW - timedelta(seconds=45)),
    ("1w", NOW - timedelta(weeks=1)), (" 2H ", NOW - timedelta(hours=2)),
    ("2026-11-01T09:30", datetime(2026, 11, 1, 9, 30, tzinfo=UTC)),
    ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
    ("2026-11-01T09:30:00+02:00", datetime(2026, 11, 1, 7, 30, tzinfo=UTC)),
])
def test_since_takes_a_duration_or_an_iso_time(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "10", "5y", "-2h", ""])
def test_since_rejects_anything_else_with_examples(text: str) -> None:
    with pytest.raises(ConfigError, match=r"give e\.g\. 10m, 2h, 3d or 2026-11-01T09:30"):
        parse_since(text, NOW)


def test_the_filter_model_parses_since_from_text() -> None:
    spec = DeadLetterFilter.model_validate({"since": "2026-11-01T00:00Z", "error": "ToolError"})
    assert spec.since == datetime(2026, 11, 1, tzinfo=UTC)
    assert spec.filtered
    assert not DeadLetterFilter(ids=("abc",)).filtered


def letter(ident: str, **fields: Any) -> DeadLetter:
    base: dict[str, Any] = {
        "reason": "r", "error_type": "ToolError", "topic": "af.invoice_triage.validate",
        "partition": 0, "offset": 0, "consumer_group": "g", "workflow": "invoice_triage",
        "step": "validate", "failed_at": NOW, "key": b"run-9", "value": b"v"}
    return DeadLetter(dead_letter_id=ident, **{**base, **fields})


LETTERS = [
    letter("aaaa-1"),
    letter("aaab-2", error_type="DecodeError", workflow=None, step=None,
           topic="af.triggers.crm", failed_at=NOW - timedelta(days=2)),
    letter("bbbb-3", workflow="lead_enrichment", step="enrich",
           failed_at=NOW - timedelta(hours=3)),
    letter("cccc-4", error_type="TransientError"),
]


@pytest.mark.parametrize(("spec", "expected"), [
    (DeadLetterFilter(), ["aaaa-1", "aaab-2", "bbbb-3", "cccc-4"]),
    (DeadLetterFilter(workflow="invoice_triage"), ["aaaa-1", "cccc-4"]),
    (DeadLetterFilter(step="enrich"), ["bbbb-3"]),
    (DeadLetterFilter(error="decodeerror"), ["aaab-2"]),
    (DeadLetterFilter(since=NOW - timedelta(hours=4)), ["aaaa-1", "bbbb-3", "cccc-4"]),
    (DeadLetterFilter(workflow="invoice_triage", error="TransientError"), ["cccc-4"]),
    (DeadLetterFilter(ids=("bbbb", "aaab")), ["bbbb-3", "aaab-2"]),
    (DeadLetterFilter(ids=("aaaa", "aaab-2"), error="ToolError"), ["aaaa-1"]),
])
def test_filters_select(spec: DeadLetterFilter, expected: list[str]) -> None:
    assert [d.dead_letter_id for d in select(LETTERS, spec, set()).letters] == expected


def test_purged_letters_are_skipped_by_filters_but_not_when_named() -> None:
    purged = {"aaaa-1", "cccc-4"}
    by_filter = select(LETTERS, DeadLetterFilter(workflow="invoice_triage"), purged)
    assert by_filter.letters == []
    assert by_filter.skipped == 2
    shown = select(LETTERS, DeadLetterFilter(), purged, include_hidden=True)
    assert len(shown.letters) == 4
    assert shown.skipped == 0
    named = select(LETTERS, DeadLetterFilter(ids=("cccc",)), purged)
    assert [d.dead_letter_id for d in named.letters] == ["cccc-4"]


@pytest.mark.parametrize(("ids", "message"), [
    (("aaa",), "2 dead letters match 'aaa'"),
    (("zzz", "aaa"), "no dead letters match 'zzz'; 2 dead letters match 'aaa'"),
])
def test_an_id_must_name_exactly_one_dead_letter(ids: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        select(LETTERS, DeadLetterFilter(ids=ids), set())


def test_a_replay_that_failed_again_supersedes_its_dead_letter() -> None:
    again = letter("dddd-5", headers=[Header(key=REPLAY_HEADER, value=b"aaaa-1")])
    assert replay_of(again) == "aaaa-1"
    assert superseded([*LETTERS, again]) == {"aaaa-1": "dddd-5"}


# --- replay plans -----------------------------------------------------------------------

def no_workflows(name: str, version: int) -> float | None:
    raise UnknownWorkflowError(f"workflow '{name}' is not loaded")


def planned(d: DeadLetter, timeout_of: Any = no_workflows) -> Replay:
    plan = plan_replay(d, NAMES, timeout_of, now=NOW)
    assert isinstance(plan, Replay), plan
    return plan


def test_a_trigger_replays_to_its_topic_with_lineage_and_without_redacted_headers() -> None:
    d = letter("t-1", topic="af.triggers.crm", key=b"crm-42", value=b'{"event_type":"x"}',
               headers=[Header(key="x-api-key", value=b"[redacted]"),
                        Header(key="traceparent", value=TRACE.encode()),
                        Header(key="x-empty", value=None),
                        Header(key=REPLAY_HEADER, value=b"older")])
    plan = planned(d)
    assert plan.message.topic == "af.triggers.crm"
    assert (plan.message.key, plan.message.value) == (b"crm-42", b'{"event_type":"x"}')
    assert plan.message.headers == (("traceparent", TRACE.encode()),
                                    (REPLAY_HEADER, b"t-1"))
    assert plan.run is None
    assert plan.note == ""


def step_letter(topic: str, message: StepMessage = MESSAGE) -> DeadLetter:
    value, headers = encode(message)
    return letter("s-1", topic=topic, key=message.run_id.encode(), value=value,
                  headers=[Header(key=k, value=v) for k, v in headers]
                  + [Header(key=FIRST_FAILURE_HEADER, value=b"1"),
                     Header(key=RETRY_DUE_HEADER, value=b"2")])


def test_a_step_message_starts_again_at_attempt_one_with_a_fresh_deadline() -> None:
    plan = planned(step_letter("af.lead_enrichment.enrich"), lambda name, version: 600.0)
    assert plan.message.topic == "af.lead_enrichment.enrich"
    assert plan.run == "run-1"
    again = decode(plan.message.value, plan.message.headers, StepMessage)
    assert again.attempt == 1
    assert again.deadline == NOW + timedelta(seconds=600)
    assert again.model_dump(exclude={"attempt", "deadline"}) == \
        MESSAGE.model_dump(exclude={"attempt", "deadline"})
    keys = [k for k, _ in plan.message.headers]
    assert FIRST_FAILURE_HEADER not in keys
    assert RETRY_DUE_HEADER not in keys
    assert keys.count(SCHEMA_HEADER) == 1
    assert dict(plan.message.headers)[REPLAY_HEADER] == b"s-1"


def test_a_retry_topic_replays_to_its_step_topic_and_an_unloaded_workflow_drops_the_deadline(
        ) -> None:
    plan = planned(step_letter("af.retry.lead_enrichment.enrich.10s"))
    assert plan.message.topic == "af.lead_enrichment.enrich"
    assert decode(plan.message.value, plan.message.headers, StepMessage).deadline is None
    assert "is not loaded here, so the run's deadline was dropped" in plan.note


def test_a_message_without_a_deadline_gets_none() -> None:
    calls: list[str] = []

    def timeout_of(name: str, version: int) -> float | None:
        calls.append(name)
        return 60.0

    no_deadline = MESSAGE.model_copy(update={"deadline": None})
    plan = planned(step_letter("af.lead_enrichment.enrich", no_deadline), timeout_of)
    assert decode(plan.message.value, plan.message.headers, StepMessage).deadline is None
    assert calls == []
    assert plan.note == ""


def test_an_undecodable_step_message_is_sent_as_it_was() -> None:
    d = letter("s-2", topic="af.lead_enrichment.enrich", value=b"\xff\xff",
               headers=[Header(key=SCHEMA_HEADER, value=b"step_message.v99")])
    plan = planned(d)
    assert plan.message.value == b"\xff\xff"
    assert "sent as it was, not re-encoded" in plan.note
    assert plan.message.headers[-1] == (REPLAY_HEADER, b"s-2")


@pytest.mark.parametrize(("d", "why"), [
    (letter("n-1", value=None), "holds no value"),
    (DeadLetter(dead_letter_id="unreadable-0-7", reason="r", error_type="DecodeError",
                topic="af.dlq", partition=0, offset=7, consumer_group="", value=b"x"),
     "unreadable"),
    (letter("n-2", topic="af.results.invoice_triage"), "not a trigger, step or retry topic"),
    (letter("n-3", topic="other.triggers.crm"), "not a trigger, step or retry topic"),
])
def test_what_cannot_be_replayed_says_why(d: DeadLetter, why: str) -> None:
    plan = plan_replay(d, NAMES, no_workflows, now=NOW)
    assert isinstance(plan, Unreplayable)
    assert why in plan.why


def test_the_builder_records_the_claim_check_of_an_excerpt() -> None:
    out = dead_letter(record("af.triggers.crm", b"x" * 10), DecodeError("too big"),
                      group="af.router", dlq_topic="af.dlq", value_claim="ab" * 32)
    assert decode(out.value, out.headers, DeadLetter).value_claim == "ab" * 32


EXCERPT_REASON = ("the broker refused a message (the original value of 2000000 bytes was too "
                  "large for the dead-letter topic; only its first 65536 bytes are kept)")


@pytest.mark.parametrize(("d", "why"), [
    (letter("x-1", topic="af.triggers.crm", value_claim="ab" * 32),
     f"claim check {'ab' * 32} holds the full bytes"),
    (letter("x-2", topic="af.triggers.crm", reason=EXCERPT_REASON),
     "no claim check holds the full bytes"),
])
def test_an_excerpt_is_never_replayed_as_if_it_were_the_value(d: DeadLetter, why: str) -> None:
    plan = plan_replay(d, NAMES, no_workflows, now=NOW)
    assert isinstance(plan, Unreplayable)
    assert "its value is only an excerpt" in plan.why
    assert why in plan.why


def test_an_excerpt_replays_with_its_full_value() -> None:
    d = letter("x-3", topic="af.triggers.crm", value=b"{", value_claim="ab" * 32,
               reason=EXCERPT_REASON)
    plan = plan_replay(d, NAMES, no_workflows, now=NOW, full_value=b'{"full": true}')
    assert isinstance(plan, Replay)
    assert plan.message.value == b'{"full": true}'
