"""Traces in process: W3C trace context through the engine's messages, and the spans (the
SDK's in-memory exporter) of steps, the router, model and tool calls; off by default, with
nothing imported; a missing extra is a ConfigError naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from agentfabric import tracing
from agentfabric.errors import PermanentError
from agentfabric.executors import RouterExecutor, StepExecutor
from agentfabric.settings import Settings
from agents.engine import Engine, first_message, trace_parent_for
from agents.loader import load_workflows
from agents.model_server import ModelServerHandle
from agents.models import ModelClient, load_registry
from schemas.models import RunResult, StepMessage, TriggerEvent, utc_now
from streams.executor import Job
from streams.topics import TopicNames
from tests.faketools import sample_tools
from tests.modelfixture import models_file, scripted_server
from tests.unit.test_gateway_pipeline import Harness, Recorder, python_catalog, tool

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
async def spans() -> AsyncIterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.start(Settings(), exporter)
    try:
        yield exporter
    finally:
        await tracing.stop()
    assert not tracing.enabled()


@pytest.fixture(scope="module")
def engine(rules_workflows: Path) -> Engine:
    return Engine(load_workflows(rules_workflows), sample_tools())


def invoice() -> TriggerEvent:
    return TriggerEvent(source="erp", event_type="invoice.posted", tenant="acme", payload={
        "invoice_id": "I1", "vendor_id": "V-1001", "amount": 100, "currency": "USD",
        "invoice_date": "2026-11-01", "due_date": "2026-12-01", "po_number": "PO-1"})


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def hex_ids(span: ReadableSpan) -> tuple[str, str, str | None]:
    ctx = span.get_span_context()
    assert ctx is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", parent


@pytest.mark.parametrize("value", [
    None, "", "garbage", f"00-{TRACE_ID}-{CALLER_SPAN}", f"00-{'0' * 32}-{CALLER_SPAN}-01",
    f"00-{TRACE_ID}-{'0' * 16}-01", f"ff-{TRACE_ID}-{CALLER_SPAN}-01",
    f"00-{TRACE_ID.upper()}-{CALLER_SPAN}-01"])
def test_invalid_traceparents_are_ignored(value: str | None) -> None:
    assert tracing.parse_traceparent(value) is None


def test_a_run_keeps_the_callers_trace_and_names_each_step_as_the_next_ones_parent(
        engine: Engine) -> None:
    wf = engine.workflows.latest("invoice_triage")
    first = first_message(wf, invoice(), utc_now(), TRACEPARENT)
    assert first.trace_parent == TRACEPARENT, "the caller's span is the first step's parent"
    own = first_message(wf, invoice(), utc_now())
    parent = tracing.parse_traceparent(own.trace_parent)
    assert parent is not None
    assert parent.span_id == tracing.step_span_id(own.idempotency_key), "a root: no parent"
    # a message emitted by attempt 2 of a step names that attempt's span
    emitted = tracing.parse_traceparent(trace_parent_for(first.run_id, first.idempotency_key,
                                                         TRACEPARENT, 2))
    assert emitted == (TRACE_ID, tracing.step_span_id(first.idempotency_key, 2), "01")
    assert tracing.step_span_id("k", 2) != tracing.step_span_id("k", 1)


async def run_through_executors(engine: Engine, settings: Settings, event: TriggerEvent,
                                trace: str | None) -> RunResult:
    names = TopicNames(settings.topic_prefix)
    router = RouterExecutor(engine, names, settings)
    [emit] = await router.execute(Job(message=event, dedupe_key=None, timeout_s=5,
                                      done_key=f"trigger:{event.event_id}", trace_parent=trace))
    message = emit.model
    for _ in range(20):
        assert isinstance(message, StepMessage)
        step = StepExecutor(engine, names, settings, message.workflow, message.step)
        out = await step.execute(Job(message=message, dedupe_key=None, timeout_s=5,
                                     subject=message, trace_parent=message.trace_parent))
        after = out[0].model
        if isinstance(after, RunResult):
            return after
        message = after
    raise AssertionError("the run did not finish")


async def test_step_spans_chain_in_one_trace_under_the_callers_span(
        engine: Engine, spans: InMemorySpanExporter) -> None:
    settings = Settings()
    result = await run_through_executors(engine, settings, invoice(), TRACEPARENT)
    assert result.trace_parent is not None
    assert TRACE_ID in result.trace_parent
    found = spans.get_finished_spans()
    assert {hex_ids(s)[0] for s in found} == {TRACE_ID}
    route = by_name(spans)["route erp"]
    assert hex_ids(route)[2] == CALLER_SPAN
    steps = sorted((s for s in found if s.name.startswith("step ")),
                   key=lambda s: s.start_time or 0)
    assert [s.name.removeprefix("step invoice_triage.") for s in steps] == result.path
    parent = hex_ids(route)[1]
    for span in steps:
        assert hex_ids(span)[2] == parent, f"{span.name} is a child of the step before"
        parent = hex_ids(span)[1]
        attrs = dict(span.attributes or {})
        assert attrs["agentfabric.run_id"] == result.run_id
        assert attrs["agentfabric.tenant"] == "acme"
        assert attrs["agentfabric.attempt"] == 1
        assert span.status.status_code != StatusCode.ERROR
    assert dict(steps[-1].attributes or {})["agentfabric.outcome"] == "result"
    assert dict(steps[0].attributes or {})["agentfabric.outcome"] == "next"


async def test_a_run_started_without_a_trace_is_rooted_at_its_first_step(
        engine: Engine, spans: InMemorySpanExporter) -> None:
    result = await run_through_executors(engine, Settings(), invoice(), None)
    found = spans.get_finished_spans()
    assert not [s for s in found if s.name.startswith("route")], "no trace: no router span"
    roots = [s for s in found if s.parent is None]
    assert [s.name for s in roots] == [f"step invoice_triage.{result.path[0]}"]
    assert {hex_ids(s)[0] for s in found} == {result.run_id.replace("-", "")}


async def test_a_failing_step_is_an_error_span_with_a_redacted_reason(
        engine: Engine, spans: InMemorySpanExporter) -> None:
    [message] = engine.start(invoice(), TRACEPARENT)
    broken = message.model_copy(update={"attempt": 3})

    class Failing(Engine):
        async def run_step(self, msg: StepMessage, **kw: Any) -> Any:
            raise PermanentError("the service said api_key=sk-abcdefghijklmnopqrstuvwx")

    failing = Failing(engine.workflows, sample_tools())
    step = StepExecutor(failing, TopicNames("af"), Settings(), "invoice_triage",
                        message.step)
    with pytest.raises(PermanentError):
        await step.execute(Job(message=broken, dedupe_key=None, timeout_s=5, subject=broken))
    [span] = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert "sk-abc" not in (span.status.description or "")
    assert "PermanentError" in (span.status.description or "")
    attrs = dict(span.attributes or {})
    assert attrs["error.type"] == "PermanentError"
    assert attrs["agentfabric.attempt"] == 3
    assert hex_ids(span)[1] == tracing.step_span_id(broken.idempotency_key, 3)


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServerHandle]:
    async with scripted_server({"rules": [{"match": {}, "turns": [{"content": "fine"}]}]}) \
            as handle:
        yield handle


async def test_a_model_call_span_has_the_model_and_tokens_never_the_prompt(
        model_server: ModelServerHandle, tmp_path: Path, spans: InMemorySpanExporter) -> None:
    registry = load_registry(models_file(tmp_path, model_server.url))
    client = ModelClient(registry, max_retries=0)
    try:
        with tracing.linked_span("step x.y", tracing.parse_traceparent(TRACEPARENT)) as step:
            await client.chat("local", [{"role": "user", "content": "secret prompt text"}])
    finally:
        await client.close()
    found = by_name(spans)
    chat = found["chat fabric-local-1"]
    assert hex_ids(chat)[2] == hex_ids(found["step x.y"])[1]
    assert step.traceparent is not None
    attrs = dict(chat.attributes or {})
    assert attrs["gen_ai.request.model"] == "fabric-local-1"
    assert attrs["agentfabric.model"] == "local"
    assert int(str(attrs["gen_ai.usage.input_tokens"])) > 0
    assert int(str(attrs["gen_ai.usage.output_tokens"])) > 0
    assert not [v for v in attrs.values() if "secret prompt" in str(v) or v == "fine"]


async def test_a_tool_call_span_has_the_tool_and_outcome_never_the_arguments(
        spans: InMemorySpanExporter) -> None:
    h = Harness(python_catalog((tool(), Recorder({"name": "Acme"}))))
    with tracing.span("step wf.step"):
        await h("crm.lookup", {"domain": "acme.io"})
    found = by_name(spans)
    call = found["tool crm.lookup"]
    assert hex_ids(call)[2] == hex_ids(found["step wf.step"])[1]
    attrs = dict(call.attributes or {})
    assert (attrs["agentfabric.tool"], attrs["agentfabric.outcome"]) == ("crm.lookup", "ok")
    assert attrs["agentfabric.attempts"] == 1
    assert not [v for v in attrs.values() if "acme.io" in str(v) or v == "Acme"]


async def test_an_entry_span_propagates_the_callers_trace_or_starts_one(
        spans: InMemorySpanExporter) -> None:
    with tracing.entry_span("POST /runs", TRACEPARENT) as joined:
        pass
    with tracing.entry_span("POST /runs", "not a traceparent") as fresh:
        pass
    a, b = (tracing.parse_traceparent(s.traceparent) for s in (joined, fresh))
    assert a is not None
    assert b is not None
    assert a.trace_id == TRACE_ID
    assert a.span_id != CALLER_SPAN
    assert b.trace_id != TRACE_ID


async def test_with_tracing_off_the_callers_trace_is_passed_on_unchanged() -> None:
    assert not tracing.enabled()
    with tracing.entry_span("POST /runs", TRACEPARENT) as handle:
        assert handle.traceparent == TRACEPARENT
    with tracing.entry_span("POST /runs", None) as handle:
        assert handle.traceparent is None
    with tracing.span("x") as handle:
        assert handle is tracing.NO_SPAN
    assert tracing.current_traceparent() is None


def test_the_endpoint_is_validated() -> None:
    with pytest.raises(ValueError, match="http"):
        Settings(otlp_endpoint="collector:4318")
    assert tracing._endpoint("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing._endpoint("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")},
           "PYTHONPATH": str(ROOT)}


@pytest.mark.timeout(120)
def test_off_by_default_nothing_is_imported_or_exported(clean_env: dict[str, str]) -> None:
    code = textwrap.dedent("""
        import asyncio, sys
        import agentfabric.worker, agentfabric.client, agentfabric.ingress.app
        import agents.models, tools.gateway.pipeline, tools.gateway.http
        from agentfabric import tracing
        from agentfabric.settings import load_settings
        assert not tracing.start(load_settings())
        with tracing.span("x") as s:
            assert s is tracing.NO_SPAN
        asyncio.run(tracing.stop())
        # (redis-py imports OpenTelemetry's metrics on its own when installed: not ours)
        leaked = sorted(n for n in sys.modules
                        if n.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")))
        assert not leaked, leaked
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], env=clean_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.timeout(120)
def test_an_endpoint_without_the_extra_is_a_config_error(
        clean_env: dict[str, str]) -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["opentelemetry"] = None
        from agentfabric import tracing
        from agentfabric.errors import ConfigError
        from agentfabric.settings import load_settings
        try:
            tracing.start(load_settings(otlp_endpoint="http://127.0.0.1:4318"))
        except ConfigError as exc:
            print(exc)
        else:
            raise SystemExit("no error")
    """)
    done = subprocess.run([sys.executable, "-c", code], env=clean_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr
    assert "agentfabric[otel]" in done.stdout


def test_the_traces_url_comes_from_the_setting_or_the_standard_otel_variables() -> None:
    from agentfabric.settings import Settings
    from agentfabric.tracing import traces_url

    plain = Settings()
    assert traces_url(plain, {}) is None
    assert traces_url(plain, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == \
        "http://collector:4318/v1/traces"
    assert traces_url(plain, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/t",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}) == \
        "http://c:4318/t"
    assert traces_url(plain, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                              "OTEL_SDK_DISABLED": "true"}) is None
    assert traces_url(plain, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                              "OTEL_TRACES_EXPORTER": "none"}) is None
    ours = Settings(otlp_endpoint="http://tempo:4318/")
    assert traces_url(ours, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}) == \
        "http://tempo:4318/v1/traces"


async def test_the_standard_otel_endpoint_variable_turns_tracing_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agentfabric import tracing
    from agentfabric.settings import Settings

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert tracing.start(Settings())
    try:
        assert tracing.enabled()
    finally:
        await tracing.stop()
    assert not tracing.enabled()
