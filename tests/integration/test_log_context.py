"""A trace id sent in with an event appears on every step's log line and on the result; the
log lines are JSON bound to run id, workflow, step and tenant (real broker and Redis)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from agentfabric.settings import Settings
from agentfabric.tenancy import TenantPolicy
from streams.topics import TopicNames

from .helpers import cases, collect_results, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"



async def test_the_trace_id_sent_in_is_on_every_step_line_and_on_the_result(
        settings: Settings, log_output: io.StringIO) -> None:
    acme = TenantPolicy(fixed="acme")
    settings = settings.model_copy(update={"trigger_tenants": {"crm": acme, "erp": acme}})
    [case] = [c for c in cases(2, seed=3, first_id=900) if c.workflow == "invoice_triage"]
    topic = TopicNames(settings.topic_prefix).trigger(case.event.source)
    async with running_worker(settings):
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        try:
            body = case.event.model_dump(mode="json", exclude={"source", "occurred_at"})
            await producer.send_and_wait(topic, json.dumps(body).encode(),
                                         key=case.event.event_id.encode(),
                                         headers=[("traceparent", TRACEPARENT.encode())])
        finally:
            await producer.stop()
        [result] = await collect_results(settings, "invoice_triage", 1)

    assert result.trace_parent is not None
    assert result.trace_parent.split("-")[1] == TRACE_ID
    lines: list[dict[str, Any]] = [json.loads(line)
                                   for line in log_output.getvalue().splitlines()]
    assert all({"timestamp", "level", "logger", "event"} <= line.keys() for line in lines)
    finished = [line for line in lines if line.get("outcome") == "ok"
                and line.get("run_id") == result.run_id
                and str(line.get("consumer")).startswith("invoice_triage.")]
    assert [line["step"] for line in finished] == result.path, "one line per step, in order"
    for line in finished:
        assert line["workflow"] == "invoice_triage"
        assert line["tenant"] == "acme"
        assert line["trace_id"] == TRACE_ID
        assert line["level"] == "debug"
        assert line["latency_ms"] >= 0
        assert line["consumer"] == f"invoice_triage.{line['step']}"
    [routed] = [line for line in lines if line.get("consumer") == "router"
                and line.get("outcome") == "ok"]
    assert (routed["tenant"], routed["trace_id"]) == ("acme", TRACE_ID)
    # whatever else was logged while the run's records were processed carries the trace too
    untraced = [line for line in lines
                if line.get("run_id") == result.run_id and line.get("trace_id") != TRACE_ID]
    assert not untraced
