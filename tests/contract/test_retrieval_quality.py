"""Retrieval quality with the real MiniLM embedder over the labelled company knowledge base."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

import tools
from tools.vectors import Document, EmbeddedVectorStore, MiniLMEmbedder

KB = Path(tools.__file__).parent / "data" / "kb"
COLLECTION, TENANT, K = "Kb_eval", "eval", 3
MIN_RECALL = 0.8


class LabelledQuery(BaseModel):
    query: str = Field(min_length=1)
    relevant: list[str] = Field(min_length=1, max_length=3)


def load_docs() -> list[Document]:
    lines = (KB / "retrieval_docs.jsonl").read_text(encoding="utf-8").splitlines()
    return [Document.model_validate_json(line) for line in lines if line.strip()]


def load_queries() -> list[LabelledQuery]:
    lines = (KB / "retrieval_queries.jsonl").read_text(encoding="utf-8").splitlines()
    return [LabelledQuery.model_validate_json(line) for line in lines if line.strip()]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def test_dataset_is_well_formed() -> None:
    docs, queries = load_docs(), load_queries()
    assert len(docs) >= 60
    assert len(queries) >= 20
    ids = [d.id for d in docs]
    assert len(set(ids)) == len(ids)
    assert len({d.text for d in docs}) == len(docs)
    for d in docs:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", d.text) if s]
        assert 2 <= len(sentences) <= 4, d.id
        assert set(d.metadata) == {"industry", "country", "employees"}, d.id
        assert isinstance(d.metadata["employees"], int), d.id
    text_by_id = {d.id: d.text for d in docs}
    for q in queries:
        assert set(q.relevant) <= set(ids), q.query
        # Paraphrases, not copies: no run of five words shared with a relevant document.
        q_words = words(q.query)
        grams = {tuple(q_words[i:i + 5]) for i in range(len(q_words) - 4)}
        for doc_id in q.relevant:
            d_words = words(text_by_id[doc_id])
            doc_grams = {tuple(d_words[i:i + 5]) for i in range(len(d_words) - 4)}
            assert not grams & doc_grams, (q.query, doc_id)


def recall_at_k(ranked: list[str], relevant: list[str]) -> float:
    return len(set(ranked[:K]) & set(relevant)) / len(relevant)


@pytest.mark.timeout(300)
async def test_recall_at_3_with_minilm(tmp_path: Path) -> None:
    docs, queries = load_docs(), load_queries()
    embedder = MiniLMEmbedder()
    store = EmbeddedVectorStore(tmp_path)
    try:
        started = time.perf_counter()
        doc_vectors = await embedder.embed([d.text for d in docs])
        embedded = time.perf_counter()
        await store.ensure_collection(COLLECTION, embedder.dim)
        assert await store.upsert(COLLECTION, TENANT, docs, doc_vectors) == len(docs)
        query_vectors = await embedder.embed([q.query for q in queries])
        searched = time.perf_counter()
        recalls: dict[float, float] = {}
        for alpha in (1.0, 0.5):
            total = 0.0
            for q, vector in zip(queries, query_vectors, strict=True):
                hits = await store.search(COLLECTION, TENANT, vector, k=K, query_text=q.query,
                                          alpha=alpha)
                assert len(hits) == K
                total += recall_at_k([h.id for h in hits], q.relevant)
            recalls[alpha] = total / len(queries)
        finished = time.perf_counter()
    finally:
        await store.close()
    n = len(queries)
    print(f"\nrecall@3 = {recalls[1.0]:.3f} over {n} queries (MiniLM, vector search)")
    print(f"recall@3 = {recalls[0.5]:.3f} over {n} queries (hybrid, alpha=0.5)")
    print(f"timings: load+embed {len(docs)} docs {embedded - started:.2f}s, ingest+embed "
          f"queries {searched - embedded:.2f}s, {2 * n} searches {finished - searched:.3f}s")
    assert recalls[1.0] >= MIN_RECALL
