"""One redaction for logs, dead-letter reasons, the gateway's error texts and the CLI's output,
tested with the forms that leaked; payload text printed by the CLI with its markup escaped and
its control sequences removed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import UTC, datetime

import pytest
import structlog
from aiokafka import ConsumerRecord
from rich.console import Console

from agentfabric.errors import PermanentError
from agentfabric.logs import configure_logging
from agentfabric.redaction import (
    REDACTED,
    is_secret_key,
    redact,
    redact_value,
    strip_control,
    terminal_text,
)
from agentfabric.tables import dead_letters_table, describe_dead_letter, results_table
from schemas.models import DeadLetter, RunResult
from schemas.serde import decode
from streams.dlq import dead_letter
from streams.leases import LeaseKeeper
from streams.logcontext import record_fields
from tests.logcapture import captured_logs
from tools.gateway.redact import sanitize_error

pytestmark = pytest.mark.timeout(30)

# (text that leaked before, the secret in it, what must stay)
LEAKS = [
    ('{"api_key": "sk-live-0123456789abcdef"}', "sk-live-0123456789abcdef", '"api_key": '),
    ("connect(password='hunter2 two')", "hunter2", "password="),
    ("cannot reach redis://:s3cretpw@cache.internal:6379/0", "s3cretpw", "cache.internal"),
    ("oauth client_secret: Zq8xVv3LmN0p", "Zq8xVv3LmN0p", "client_secret: "),
    ("env OPENAI_API_KEY=sk-abcdefghijklmnop1234 set", "sk-abcdefghijklmnop1234",
     "OPENAI_API_KEY="),
    ("sent Authorization: Basic dXNlcjpwYXNzd29yZA== to crm", "dXNlcjpwYXNzd29yZA==",
     "Authorization: "),
]
MORE = [
    ("{'token': 'abc123def'}", "abc123def"),
    ('{\\"refresh_token\\": \\"rt-998877\\"}', "rt-998877"),
    ("POST https://bot:hunter2@crm.example/x?access_token=AT-55&y=1", "hunter2"),
    ("POST https://crm.example/x?access_token=AT-55&y=1", "AT-55"),
    ("DB_PASSWORD=pa55word", "pa55word"),
    ("GITHUB_TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123", "ghp_abcdefghijklmnopqrstuvwxyz0123"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI"),
    ("header X-Api-Key: 0123456789abcdef", "0123456789abcdef"),
    ("Authorization: Bearer abc.def.ghi-123456", "abc.def.ghi-123456"),
    ("bare key sk-proj-ABCDEFGHIJKLMNOP in text", "sk-proj-ABCDEFGHIJKLMNOP"),
    ('"Authorization": "Basic dXNlcjpwYXNz"', "dXNlcjpwYXNz"),
]


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
def test_redact_masks_each_leak_form_and_keeps_the_key(text: str, secret: str,
                                                       kept: str) -> None:
    clean = redact(text)
    assert secret not in clean
    assert REDACTED in clean
    assert kept in clean


@pytest.mark.parametrize(("text", "secret"), MORE)
def test_redact_masks_more_forms(text: str, secret: str) -> None:
    clean = redact(text)
    assert secret not in clean
    assert REDACTED in clean


@pytest.mark.parametrize("text", [
    "invalid request body: score: Input should be less than or equal to 100",
    "token_count: 5, keyboard layout", "design: blue; tokens=12",
    "see https://crm.example/api/leads?page=2", "run 3f2c1a finished in 12 ms",
    "Basic information is missing",
])
def test_redact_keeps_ordinary_text(text: str) -> None:
    assert redact(text) == text


def test_redact_value_keeps_json_valid() -> None:
    value = {"password": 123, "nested": [{"api_key": "x"}, "redis://:pw@h"], "n": 1,
             "client_secret": None, "tokens": 5}
    assert redact_value(value) == {"password": REDACTED,
                                   "nested": [{"api_key": REDACTED}, f"redis://{REDACTED}@h"],
                                   "n": 1, "client_secret": None, "tokens": 5}
    assert is_secret_key("OPENAI_API_KEY")
    assert not is_secret_key("trace_id")


def test_the_gateway_uses_the_same_redaction() -> None:
    for text, secret, _ in LEAKS:
        assert secret not in sanitize_error(text)
        assert sanitize_error(text) == " ".join(redact(text).split())


# --- logs ---------------------------------------------------------------------------------


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
def test_log_lines_are_redacted(log_output: io.StringIO, text: str, secret: str,
                                kept: str) -> None:
    log = logging.getLogger("tests.redaction")
    log.warning("calling the CRM: %s", text, extra={"detail": text, "api_key": "k-1"})
    try:
        raise RuntimeError(text)
    except RuntimeError:
        log.exception("failed")
    structlog.get_logger("tests.native").info("native", detail=text)
    output = log_output.getvalue()
    assert secret not in output
    lines = _lines(log_output)
    assert len(lines) == 3
    first = lines[0]
    assert first["level"] == "warning"
    assert first["logger"] == "tests.redaction"
    assert "timestamp" in first
    assert first["api_key"] == REDACTED
    assert kept in str(first["event"])
    assert kept in str(lines[1]["exception"])


def test_bound_fields_reach_stdlib_log_lines(log_output: io.StringIO) -> None:
    with structlog.contextvars.bound_contextvars(run_id="r-1", trace_id="t" * 32):
        logging.getLogger("tests.bound").info("inside")
    logging.getLogger("tests.bound").info("outside")
    inside, outside = _lines(log_output)
    assert (inside["run_id"], inside["trace_id"]) == ("r-1", "t" * 32)
    assert "run_id" not in outside


async def test_a_records_fields_reach_its_lines_and_those_of_tasks_it_starts(
        log_output: io.StringIO) -> None:
    """The runtime's log_context stage binds a record's fields as one context variable: every
    line inside (a task started inside included) carries them, a field the line sets itself
    wins, and nothing leaks past the block."""
    log = logging.getLogger("tests.record")

    async def in_a_task() -> None:
        log.info("in a task")

    with record_fields({"run_id": "r-2", "step": "score", "consumer": "wf.score"}):
        log.info("inside")
        await asyncio.create_task(in_a_task())
        log.info("own step", extra={"step": "mine"})
        structlog.get_logger("tests.record").bind(step="bound").info("structlog own step")
    log.info("outside")
    inside, task, own, bound, outside = [line for line in _lines(log_output)
                                         if line["logger"] == "tests.record"]
    assert (inside["run_id"], inside["step"], inside["consumer"]) == ("r-2", "score", "wf.score")
    assert task["run_id"] == "r-2"
    assert (own["step"], own["run_id"]) == ("mine", "r-2")
    assert (bound["step"], bound["run_id"]) == ("bound", "r-2")
    assert "run_id" not in outside
    assert "consumer" not in outside


async def test_concurrent_records_log_their_own_fields(log_output: io.StringIO) -> None:
    log = logging.getLogger("tests.concurrent")

    async def one(run_id: str) -> None:
        with record_fields({"run_id": run_id}):
            for i in range(3):
                log.info("line %d", i)
                await asyncio.sleep(0)  # the other record's lines come in between

    await asyncio.gather(one("r-a"), one("r-b"))
    lines = [line for line in _lines(log_output) if line["logger"] == "tests.concurrent"]
    assert len(lines) == 6
    assert [line["run_id"] for line in lines] == ["r-a", "r-b"] * 3


async def test_a_shared_background_task_logs_without_the_fields_of_the_record_that_started_it(
        log_output: io.StringIO) -> None:
    """The lease keeper is started by the first record that takes a lease and then renews
    every record's: the line about another record's lost lease must not name the first."""
    lost_now: set[str] = set()

    class Store:
        async def renew(self, held: dict[str, str], ttl_ms: int) -> set[str]:
            return {key for key in held if key in lost_now}

    keeper = LeaseKeeper(Store(), ttl_ms=30)  # type: ignore[arg-type]
    try:
        with record_fields({"run_id": "run-A", "step": "a"}):
            keeper.hold("key-A", "t-A")  # starts the keeper
        with record_fields({"run_id": "run-B", "step": "b"}):
            keeper.hold("key-B", "t-B")
        lost_now.add("key-B")
        for _ in range(100):
            if "key-B" in keeper.lost:
                break
            await asyncio.sleep(0.01)
        assert "key-B" in keeper.lost
    finally:
        await keeper.close()
    [line] = [line for line in _lines(log_output) if "was lost" in str(line["event"])]
    assert "key-B" in str(line["event"])
    assert "run_id" not in line
    assert "step" not in line


def test_console_format_is_redacted_too() -> None:
    with captured_logs("INFO", "console") as stream:
        logging.getLogger("tests.console").warning("url %s", "redis://:pw@h")
    assert "redis://[redacted]@h" in stream.getvalue()
    assert ":pw@" not in stream.getvalue()
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("INFO", "xml")  # type: ignore[arg-type]


# --- dead letters -------------------------------------------------------------------------

def _record(value: bytes = b"{}") -> ConsumerRecord:
    return ConsumerRecord(topic="af.lead.score", partition=0, offset=7, timestamp=0,
                          timestamp_type=0, key=b"k", value=value, checksum=None,
                          serialized_key_size=1, serialized_value_size=len(value),
                          headers=[("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 +
                                    b"-01")])


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
@pytest.mark.parametrize("error_class", [RuntimeError, PermanentError])
def test_dead_letter_reasons_are_redacted_and_logged_once(
        caplog: pytest.LogCaptureFixture, text: str, secret: str, kept: str,
        error_class: type[Exception]) -> None:
    with caplog.at_level(logging.WARNING, logger="streams.dlq"):
        out = dead_letter(_record(), error_class(text), group="g", dlq_topic="af.dlq")
    letter = decode(out.value, out.headers, DeadLetter)
    assert secret not in letter.reason
    assert kept in letter.reason
    [line] = [r for r in caplog.records if r.name == "streams.dlq"]
    assert line.levelno == logging.WARNING
    assert secret not in line.getMessage()
    assert line.__dict__["reason"] == letter.reason
    assert line.__dict__["error_type"] == letter.error_type
    assert line.__dict__["trace_id"] == "a" * 32


def test_a_stand_in_dead_letter_is_not_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="streams.dlq"):
        dead_letter(_record(), PermanentError("too big"), group="g", dlq_topic="af.dlq",
                    logged=False)
    assert not [r for r in caplog.records if r.name == "streams.dlq"]


# --- CLI output ---------------------------------------------------------------------------

def _render(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None, force_terminal=False)
    console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


HOSTILE = "[bold]boss[/bold] \x1b[31mred\x1b[0m\x07 bell\u202egnp.exe"


def test_terminal_text_escapes_markup_and_drops_control_sequences() -> None:
    assert strip_control("a\tb\nc\x1b[2J\x00d\x1b]0;title\x07e") == "a\tb\ncde"
    shown = _render(terminal_text(HOSTILE))
    assert "[bold]boss[/bold]" in shown
    assert "\x1b" not in shown
    assert "\x07" not in shown
    assert "\u202e" not in shown
    assert "red bell" in shown


def _result(output: dict[str, object]) -> RunResult:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return RunResult(run_id="r" * 32, workflow="wf", workflow_version=1, event_id="e-1",
                     source="crm", event_type="x", tenant="acme", status="completed",
                     output=output, path=["a"], started_at=now, finished_at=now)


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
def test_results_table_redacts_escapes_and_cleans(text: str, secret: str, kept: str) -> None:
    shown = _render(results_table("wf", [_result({"note": text, "label": HOSTILE,
                                                  "api_key": "k-12345"})]))
    assert secret not in shown
    assert "k-12345" not in shown
    assert "[bold]boss" in shown, "markup from a payload is printed, not applied"
    assert "\x1b" not in shown


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
def test_dead_letter_tables_redact_escape_and_clean(text: str, secret: str, kept: str) -> None:
    letter = DeadLetter(dead_letter_id="d" * 36, reason=f"{HOSTILE} {text}",
                        error_type="ToolError", topic="af.t", partition=0, offset=1,
                        consumer_group="g", value=f'{{"x": "{HOSTILE}", "raw": "{text}"}}'
                        .encode())
    for renderable in (dead_letters_table([letter]), describe_dead_letter(letter)):
        shown = _render(renderable)
        assert secret not in shown
        assert "[bold]boss" in shown
        assert "\x1b" not in shown
        assert "\u202e" not in shown


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS)
def test_dead_letter_json_lines_are_redacted(text: str, secret: str, kept: str) -> None:
    from agentfabric.cli_dlq import _json_row
    from agentfabric.dlq_ops import Marks

    letter = DeadLetter(dead_letter_id="d" * 36, reason=f"failed: {text}",
                        error_type="ToolError", topic="af.t", partition=0, offset=1,
                        consumer_group="g", value=b"{}")
    row = json.loads(_json_row(letter, Marks(frozenset(), {}), None))
    assert secret not in json.dumps(row)
    assert row["dead_letter_id"] == "d" * 36
