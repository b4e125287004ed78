"""The lookup step on the embedded store with the real MiniLM embeddings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from agents.engine import Engine
from agents.loader import parse_workflow
from agents.replay import replay_run
from agents.workflow import WorkflowSet
from schemas.models import RunResult, TriggerEvent
from tests.faketools import sample_tools
from tools.knowledge import KnowledgeBase, read_documents
from tools.vectors import EmbeddedVectorStore, MiniLMEmbedder

pytestmark = pytest.mark.timeout(180)

DOCS = Path(__file__).parents[2] / "tools/data/kb/retrieval_docs.jsonl"
WORKFLOW = yaml.safe_load("""
name: similar
version: 1
trigger: {source: crm, event_types: [lead.created]}
steps:
  - id: find
    kind: lookup
    collection: Companies
    query: "{{ input.need }}"
    k: 3
    filters:
      - {field: employees, op: gte, value: "{{ input.min_size }}"}
  - id: pick
    kind: transform
    output: "{{ steps.find.hits[0].id if steps.find.hits else null }}"
""")


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


@pytest.fixture
async def engine(tmp_path: Path, embedder: MiniLMEmbedder) -> AsyncIterator[Engine]:
    kb = KnowledgeBase(EmbeddedVectorStore(tmp_path / "vectors"), embedder)
    await kb.ingest("Companies", "acme", read_documents([DOCS]))
    try:
        yield Engine(WorkflowSet([parse_workflow(WORKFLOW, "similar.yaml")]),
                     sample_tools(), knowledge=kb, record_all=True)
    finally:
        await kb.close()


def lead(tenant: str, need: str, min_size: int = 0) -> TriggerEvent:
    return TriggerEvent(source="crm", event_type="lead.created", tenant=tenant,
                        payload={"need": need, "min_size": min_size})


async def run(engine: Engine, event: TriggerEvent) -> tuple[RunResult, list[object]]:
    [message] = engine.start(event)
    first = await engine.run_step(message)
    second = await engine.run_step(first.next)  # type: ignore[arg-type]
    assert isinstance(second.next, RunResult)
    return second.next, [first.recording, second.recording]


async def test_lookup_finds_the_semantically_closest_company(engine: Engine) -> None:
    result, _ = await run(engine, lead("acme", "refrigerated transport for vaccines"))
    assert result.output == "doc-001"  # the cold-chain logistics company
    hits = result.context["find"]["hits"]
    assert len(hits) == 3
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


async def test_filters_apply(engine: Engine) -> None:
    result, _ = await run(engine, lead("acme", "refrigerated transport for vaccines",
                                       min_size=100_000))
    assert result.context["find"]["hits"] == []


async def test_a_tenant_never_sees_another_tenants_documents(engine: Engine) -> None:
    result, _ = await run(engine, lead("globex", "refrigerated transport for vaccines"))
    assert result.context["find"]["hits"] == []
    assert result.output is None


async def test_recorded_lookups_replay_without_the_store(engine: Engine) -> None:
    _, recordings = await run(engine, lead("acme", "law firm contract review software"))
    assert engine.knowledge is not None
    await engine.knowledge.close()
    engine.knowledge = None  # the replay must not need it
    steps = await replay_run(engine, recordings)  # type: ignore[arg-type]
    assert [s.identical for s in steps] == [True, True]
