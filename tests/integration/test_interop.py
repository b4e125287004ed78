"""Another Kafka client reads a result topic with nothing but the ``.avsc`` files: runs of
invoice_triage (a worker in this process), then confluent-kafka + fastavro
(``avsc_reader``, no agentfabric imports) see the same results as agentfabric's reader."""

from __future__ import annotations

import ast
import asyncio
import random
from pathlib import Path

import pytest

from agentfabric.settings import Settings
from streams.topics import TopicNames

from . import avsc_reader
from .helpers import check_results, collect_results, invoice_case, publish_cases, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FIRST_PARTY = {"agentfabric", "streams", "agents", "tools", "schemas"}


def test_the_reader_imports_nothing_of_agentfabric() -> None:
    tree = ast.parse(Path(avsc_reader.__file__).read_text(encoding="utf-8"))
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}
    assert not {m.split(".")[0] for m in modules} & FIRST_PARTY, modules


async def test_confluent_kafka_reads_results_with_only_the_avsc_files(
        settings: Settings) -> None:
    rng = random.Random(11)
    batch = [invoice_case(i, rng) for i in range(4)]
    async with running_worker(settings):
        await publish_cases(settings, batch)
        ours = await collect_results(settings, "invoice_triage", len(batch))
    check_results(batch, ours)

    topic = TopicNames(settings.topic_prefix).results("invoice_triage")
    theirs = await asyncio.to_thread(avsc_reader.read_records, settings.bootstrap_servers,
                                     topic, len(ours))
    assert len(theirs) == len(ours)
    by_run = {r["run_id"]: r for r in theirs}
    assert len(by_run) == len(ours)
    for result in ours:
        record = by_run[result.run_id]
        assert record["_key"] == result.run_id.encode()
        assert record["_schema"].startswith("run_result.v")
        assert record["status"] == result.status == "completed"
        assert record["output"] == result.output
        assert record["context"] == result.context
        assert record["workflow"] == result.workflow
        assert record["workflow_version"] == result.workflow_version
        assert record["tenant"] == result.tenant
        assert record["path"] == result.path
        assert record["usage"] == result.usage.model_dump()
        assert record["finished_at"] == result.finished_at
        assert record["event_id"] == result.event_id
