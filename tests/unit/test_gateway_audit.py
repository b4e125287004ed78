"""Audit events and metrics: the event's fields, the hash of the arguments, the Kafka sink
that never makes a call wait for the broker (batches, flush, failures counted, a bound),
and the prometheus metrics on a registry of the caller's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from agentfabric.errors import AgentFabricError, UnavailableError
from streams.kafka import Outgoing
from tools.gateway.audit import AuditEvent, KafkaAuditSink, LogAuditSink, arguments_hash
from tools.gateway.metrics import GatewayMetrics


def event(run_id: str = "run-1", outcome: str = "ok") -> AuditEvent:
    return AuditEvent.model_validate({
        "agent": "wf.step", "tenant": "acme", "run_id": run_id, "workflow": "wf",
        "step": "step", "tool": "crm.get_account", "access": "read",
        "arguments_hash": arguments_hash({"domain": "acme.io"}), "outcome": outcome,
        "latency_ms": 1.5, "attempts": 1, "idempotency_key": "k"})


def test_arguments_hash_is_canonical() -> None:
    assert arguments_hash({"a": 1, "b": [1, 2]}) == arguments_hash({"b": [1, 2], "a": 1})
    assert arguments_hash({"a": 1}) != arguments_hash({"a": 2})
    assert len(arguments_hash({})) == 64


def test_event_fields_and_outcomes() -> None:
    data = json.loads(event().to_json())
    assert set(data) == {"event_id", "at", "agent", "tenant", "run_id", "workflow", "step",
                         "tool", "access", "arguments_hash", "outcome", "reason",
                         "latency_ms", "attempts", "idempotency_key"}
    with pytest.raises(ValidationError):
        event(outcome="exploded")


class FakeProducer:
    """Holds every batch until ``release`` is set; fails when ``error`` is set."""

    def __init__(self) -> None:
        self.batches: list[list[Outgoing]] = []
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        await self.release.wait()
        if self.error is not None:
            raise self.error
        self.batches.append(list(messages))


async def test_emit_does_not_wait_for_the_broker() -> None:
    producer = FakeProducer()
    sink = KafkaAuditSink(producer, "af.audit", batch=2)
    for i in range(5):
        sink.emit(event(f"run-{i}"))  # returns at once although the broker "hangs"
    assert sink.pending == 5
    assert producer.batches == []
    producer.release.set()
    await sink.flush()
    assert [len(b) for b in producer.batches] == [2, 2, 1]
    first = producer.batches[0][0]
    assert first.topic == "af.audit"
    assert first.key == b"run-0"
    assert json.loads(first.value)["run_id"] == "run-0"
    assert dict(first.headers)["content-type"] == b"application/json"
    assert sink.sent == 5
    assert sink.pending == 0
    await sink.close()
    with pytest.raises(AgentFabricError, match="closed"):
        sink.emit(event())


async def test_failed_sends_are_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    producer = FakeProducer()
    producer.error = UnavailableError("the broker did not acknowledge a message")
    producer.release.set()
    sink = KafkaAuditSink(producer, "af.audit")
    sink.emit(event())
    await sink.flush()
    assert (sink.sent, sink.failed) == (0, 1)
    assert "1 events not delivered to af.audit" in caplog.text
    producer.error = None
    sink.emit(event())
    await sink.close()
    assert sink.sent == 1


async def test_pending_events_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    producer = FakeProducer()
    sink = KafkaAuditSink(producer, "af.audit", batch=1, max_pending=2)
    for _ in range(4):
        sink.emit(event())
    assert (sink.pending, sink.dropped) == (2, 2)
    assert "events dropped" in caplog.text
    producer.release.set()
    await sink.close()


async def test_log_sink(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="tools.gateway.audit")
    sink = LogAuditSink()
    sink.emit(event())
    await sink.close()
    assert '"tool":"crm.get_account"' in caplog.text


def test_metrics_on_the_callers_registry() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    metrics.observe("crm.get_account", "ok", 0.02)
    metrics.observe("crm.get_account", "timeout", 1.2)
    metrics.observe("erp.get_vendor", "fallback", 0.01)
    metrics.rate_limited("crm.get_account")
    metrics.breaker_state("crm.get_account", "half_open")
    metrics.breaker_state("erp.get_vendor", "open")
    text = generate_latest(registry).decode()
    assert 'agentfabric_tool_calls_total{outcome="ok",tool="crm.get_account"} 1.0' in text
    assert 'agentfabric_tool_call_seconds_count{tool="crm.get_account"} 2.0' in text
    assert 'agentfabric_tool_rate_limited_total{tool="crm.get_account"} 1.0' in text
    assert 'agentfabric_tool_breaker_state{tool="crm.get_account"} 1.0' in text
    assert 'agentfabric_tool_breaker_state{tool="erp.get_vendor"} 2.0' in text
    assert metrics.summary() == [
        "crm.get_account: 2 calls, 1 failed, breaker half_open (ok 1, timeout 1)",
        "erp.get_vendor: 1 call, 0 failed, breaker open (fallback 1)"]
    GatewayMetrics(CollectorRegistry())  # no global registration: another one is fine
