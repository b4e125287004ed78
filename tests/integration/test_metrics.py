"""A worker's GET /metrics after a demo-sized run (40 runs of the sample rules workflows and
one malformed event), scraped over real HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import re
import socket

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agentfabric.settings import Settings
from schemas.models import DeadLetter
from streams.kafka import Outgoing, Producer
from streams.reader import read_until
from streams.topics import TopicNames

from .helpers import cases, collect_results, publish_cases, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUNS = 40
UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)
FAMILIES = [  # (name as parsed: counters lose _total, type)
    ("agentfabric_records_in", "counter"), ("agentfabric_records_out", "counter"),
    ("agentfabric_step_seconds", "histogram"), ("agentfabric_step_errors", "counter"),
    ("agentfabric_retries", "counter"), ("agentfabric_dead_letters", "counter"),
    ("agentfabric_tokens", "counter"), ("agentfabric_cost_usd", "counter"),
    ("agentfabric_step_cache", "counter"), ("agentfabric_in_flight", "gauge"),
    ("agentfabric_consumer_lag", "gauge"), ("agentfabric_tool_calls", "counter"),
    ("agentfabric_tool_call_seconds", "histogram"), ("agentfabric_tool_rate_limited", "counter"),
    ("agentfabric_tool_breaker_state", "gauge"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def total(family: Metric, suffix: str = "_total", **labels: str) -> float:
    return sum(s.value for s in family.samples if s.name == family.name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_after_a_demo_sized_run(settings: Settings) -> None:
    port = free_port()
    settings = settings.model_copy(update={"metrics_port": port})
    batch = cases(RUNS)
    leads = sum(1 for c in batch if c.workflow == "lead_enrichment")
    names = TopicNames(settings.topic_prefix)
    async with running_worker(settings) as worker:
        assert worker.metrics_url == f"http://127.0.0.1:{port}/metrics"
        await publish_cases(settings, batch)
        producer = Producer(settings, client_id="test-malformed")
        await producer.start()
        try:
            await producer.send_all([Outgoing(names.trigger("crm"), b"bad-1", b'{"payload": ')])
        finally:
            await producer.stop()
        await collect_results(settings, "lead_enrichment", leads)
        await collect_results(settings, "invoice_triage", RUNS - leads)
        await read_until(settings, names.dlq, DeadLetter, lambda found: len(found) >= 1,
                         within=30)
        async with httpx.AsyncClient(timeout=10) as client:
            deadline = asyncio.get_running_loop().time() + 30
            while True:  # the dead letter's count and the lag sample (every second) follow
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                text = response.text
                if "agentfabric_dead_letters_total{" in text and \
                        "agentfabric_consumer_lag{" in text:
                    break
                assert asyncio.get_running_loop().time() < deadline, text
                await asyncio.sleep(0.1)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES:
        assert name in families, f"{name} is missing from /metrics"
        assert families[name].type == kind, name

    records_in = families["agentfabric_records_in"]
    assert total(records_in, consumer="router", topic_kind="trigger") >= RUNS + 1
    assert total(records_in, topic_kind="step") >= RUNS
    out = families["agentfabric_records_out"]
    assert total(out, kind="result") == RUNS
    assert total(out, workflow="lead_enrichment", kind="result") == leads
    assert total(out, step="router", kind="next") == RUNS
    assert total(out, kind="next") > RUNS  # the router's, and the steps' hand-ons
    seconds = families["agentfabric_step_seconds"]
    assert total(seconds, "_count") >= 2 * RUNS
    assert total(seconds, "_sum") > 0
    letters = families["agentfabric_dead_letters"]
    assert total(letters, step="router", error="DecodeError") == 1
    assert total(families["agentfabric_step_errors"], step="router") == 1
    assert total(out, step="router", kind="dead_letter") == 1
    assert total(families["agentfabric_retries"]) == 0
    tokens = families["agentfabric_tokens"]
    assert {s.labels["tenant"] for s in tokens.samples} == {"acme"}
    assert {s.labels["direction"] for s in tokens.samples} == {"in", "out"}
    assert total(tokens) == 0  # the rules workflows call no model
    assert total(families["agentfabric_cost_usd"]) == 0
    assert all(s.value == 0 for s in families["agentfabric_in_flight"].samples)
    lag = families["agentfabric_consumer_lag"].samples
    assert lag
    assert all(s.value >= 0 for s in lag)
    assert {s.labels["group"] for s in lag} >= {names.router_group}
    calls = families["agentfabric_tool_calls"]
    assert total(calls, outcome="ok") >= RUNS  # every run looks something up in CRM or ERP
    assert total(families["agentfabric_tool_call_seconds"], "_count") >= RUNS

    for family in families.values():  # bounded labels: never a run id (nor any uuid)
        for sample in family.samples:
            for value in sample.labels.values():
                assert not UUID.search(value), f"{sample.name} has label value {value}"
