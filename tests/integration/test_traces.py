"""Traces through the real fabric (embedded broker, real Redis, the sample CRM service, the
local scripted model server): a trace id sent in with an event is on every step's log line
and on the result, and the spans exported to a test OTLP receiver form one trace: publish
-> route -> the llm step (its model and tool calls as children) -> the next step."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentfabric import tracing
from agentfabric.client import Client
from agentfabric.settings import Settings
from agents.model_server import ModelServerHandle
from schemas.models import TriggerEvent
from tests.modelfixture import FIT_RULE, fit_check, workflow_folder
from tests.otlpreceiver import OtlpReceiver, ReceivedSpan, otlp_receiver

from .helpers import collect_results, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"

SCRIPT = {"rules": [FIT_RULE]}
WORKFLOW = fit_check()



@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


@pytest.fixture
def traced(settings: Settings, model_server: ModelServerHandle, receiver: OtlpReceiver,
           tmp_path: Path) -> Settings:
    return settings.model_copy(update={
        **workflow_folder(tmp_path, WORKFLOW, model_server.url),
        "otlp_endpoint": receiver.url, "service_name": "af-traces-test"})



def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    [found] = [s for s in spans if s.name == name]
    return found


async def test_a_run_is_one_trace_from_publish_to_result(
        traced: Settings, receiver: OtlpReceiver, log_output: io.StringIO) -> None:
    event = TriggerEvent(event_id="ev-trace-1", source="crm", event_type="lead.created",
                         tenant="acme", payload={"domain": "contoso.com"})
    async with running_worker(traced):
        async with Client(traced) as client:
            [run_id] = await client.publish(event, traceparent=TRACEPARENT)
        [result] = await collect_results(traced, "fit_check", 1)
    assert not tracing.enabled(), "the worker and the client flushed and shut tracing down"

    # the result and every step's log line carry the trace id sent in
    assert result.run_id == run_id
    assert result.output == "Contoso Ltd: high"
    assert result.trace_parent is not None
    assert result.trace_parent.split("-")[1] == TRACE_ID
    lines: list[dict[str, Any]] = [json.loads(line)
                                   for line in log_output.getvalue().splitlines()]
    finished = [line for line in lines if line.get("outcome") == "ok"
                and line.get("run_id") == run_id
                and str(line.get("consumer")).startswith("fit_check.")]
    assert [line["step"] for line in finished] == result.path == ["fit", "label"]
    assert {line["trace_id"] for line in finished} == {TRACE_ID}

    # the spans form one trace, each the child of the one that caused it
    spans = list(receiver.spans)
    assert spans, "no span reached the receiver"
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert {s.service for s in spans} == {"af-traces-test"}
    ids = {s.span_id for s in spans}
    assert len(ids) == len(spans), "every span id is unique"
    assert all(s.parent_span_id in ids for s in spans if s.parent_span_id != CALLER_SPAN), \
        "every parent is a received span, or the caller's"
    publish = one(spans, "publish crm")
    route = one(spans, "route crm")
    fit = one(spans, "step fit_check.fit")
    label = one(spans, "step fit_check.label")
    assert publish.parent_span_id == CALLER_SPAN
    assert route.parent_span_id == publish.span_id
    assert fit.parent_span_id == route.span_id
    assert label.parent_span_id == fit.span_id, "steps chain in step order"
    chats = [s for s in spans if s.name.startswith("chat ")]
    [tool_call] = [s for s in spans if s.name.startswith("tool ")]
    assert len(chats) == 2, "a tool-call turn and the answer"
    assert {s.parent_span_id for s in [*chats, tool_call]} == {fit.span_id}
    assert len(spans) == 7

    assert fit.attributes["agentfabric.run_id"] == run_id
    assert (fit.attributes["agentfabric.workflow"], fit.attributes["agentfabric.step"],
            fit.attributes["agentfabric.tenant"], fit.attributes["agentfabric.attempt"]) == \
        ("fit_check", "fit", "acme", 1)
    assert fit.attributes["agentfabric.outcome"] == "next"
    assert label.attributes["agentfabric.outcome"] == "result"
    assert (tool_call.attributes["agentfabric.tool"],
            tool_call.attributes["agentfabric.outcome"]) == ("crm.get_account", "ok")
    assert all(s.attributes["gen_ai.usage.input_tokens"] > 0 for s in chats)
    assert all(s.status_code != 2 for s in spans), "no span failed"
    # neither prompts nor tool arguments nor results leave in a span
    assert not [(s.name, k) for s in spans for k, v in s.attributes.items()
                if "contoso" in str(v).lower()]
