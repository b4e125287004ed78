"""Two worker processes write to and read from one embedded vector store at the same time."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import signal
import sqlite3
import traceback
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np
import pytest

from tools.vectors import Condition, Document, EmbeddedVectorStore

pytestmark = pytest.mark.timeout(120)

COLLECTION = "Shared_docs"
SHARED = "shared"
DIM = 16
WORKERS = ("w1", "w2")
OWN_DOCS, SHARED_DOCS, BATCH = 200, 100, 10


def vector_of(doc_id: str) -> list[float]:
    """A deterministic vector whose values are exact float32s (so they round-trip exactly)."""
    seed = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    values = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return [float(x) for x in values]


def make_doc(worker: str, kind: str, i: int) -> Document:
    return Document(id=f"{worker}-{kind}-{i:04d}",
                    text=f"{kind} note {i} from {worker} about topic{i % 7}",
                    metadata={"worker": worker, "index": i, "even": i % 2 == 0,
                              "weight": i / 8})


async def work(directory: Path, worker: str) -> None:
    """Interleave batched upserts with reads, checking every read sees this worker's writes."""
    store = EmbeddedVectorStore(directory)
    own = f"tenant-{worker}"
    try:
        await store.ensure_collection(COLLECTION, DIM)  # both workers race to create the file
        for batch in range(OWN_DOCS // BATCH):
            docs = [make_doc(worker, "own", i) for i in range(batch * BATCH, (batch + 1) * BATCH)]
            assert await store.upsert(COLLECTION, own, docs, [vector_of(d.id) for d in docs]) \
                == BATCH
            assert await store.count(COLLECTION, own) == (batch + 1) * BATCH
            probe = docs[batch % BATCH]
            hits = await store.search(COLLECTION, own, vector_of(probe.id), k=3)
            assert hits[0].id == probe.id, (hits, probe)
            assert (hits[0].text, hits[0].metadata) == (probe.text, probe.metadata)
            assert hits[0].score == pytest.approx(1.0, abs=1e-5)

            if batch % 2 == 0:
                shared_batch = batch // 2
                shared = [make_doc(worker, "shared", i) for i in
                          range(shared_batch * BATCH, (shared_batch + 1) * BATCH)]
                await store.upsert(COLLECTION, SHARED, shared, [vector_of(d.id) for d in shared])
                assert await store.count(COLLECTION, SHARED) >= (shared_batch + 1) * BATCH
                mine = [Condition(field="worker", op="eq", value=worker)]
                found = await store.search(COLLECTION, SHARED, vector_of(shared[-1].id), k=5,
                                           filters=mine)
                assert found[0].id == shared[-1].id
                assert all(h.metadata["worker"] == worker for h in found)
                keyword = await store.search(COLLECTION, SHARED, vector_of(shared[0].id), k=50,
                                             query_text=f"{worker} topic3", alpha=0.5,
                                             filters=mine)
                assert keyword
                assert all(h.id.startswith(f"{worker}-") for h in keyword)
    finally:
        await store.close()


def worker_main(directory: str, worker: str, barrier: Barrier) -> None:
    """Process entry point: waits for the other worker, then works; a failure is written down."""
    try:
        barrier.wait(timeout=60)
        asyncio.run(work(Path(directory), worker))
    except BaseException:
        (Path(directory) / f"{worker}.error").write_text(traceback.format_exc())
        raise


async def check_everything(directory: Path) -> None:
    store = EmbeddedVectorStore(directory)
    try:
        for worker in WORKERS:
            assert await store.count(COLLECTION, f"tenant-{worker}") == OWN_DOCS
            expected = [make_doc(worker, "own", i) for i in range(OWN_DOCS)]
            stored = await store.get(COLLECTION, f"tenant-{worker}", [d.id for d in expected])
            assert [(s.id, s.text, s.metadata, s.vector) for s in stored] == \
                [(d.id, d.text, d.metadata, vector_of(d.id)) for d in expected]
            shared = [make_doc(worker, "shared", i) for i in range(SHARED_DOCS)]
            stored = await store.get(COLLECTION, SHARED, [d.id for d in shared])
            assert [(s.id, s.text, s.metadata, s.vector) for s in stored] == \
                [(d.id, d.text, d.metadata, vector_of(d.id)) for d in shared]
        assert await store.count(COLLECTION, SHARED) == SHARED_DOCS * len(WORKERS)
        hits = await store.search(COLLECTION, SHARED, vector_of("w2-shared-0042"), k=1)
        assert [h.id for h in hits] == ["w2-shared-0042"]
        words = await store.search(COLLECTION, "tenant-w1", vector_of("w1-own-0001"), k=200,
                                   query_text="topic4", alpha=0.0)
        assert len(words) == len([i for i in range(OWN_DOCS) if i % 7 == 4])
    finally:
        await store.close()


def test_two_processes_share_one_store(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(WORKERS))
    processes = [ctx.Process(target=worker_main, args=(str(tmp_path), w, barrier),
                             name=f"vector-worker-{w}") for w in WORKERS]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=100)
        errors = {p.name: (tmp_path / f"{w}.error").read_text()
                  for p, w in zip(processes, WORKERS, strict=True)
                  if (tmp_path / f"{w}.error").exists()}
        assert not errors, errors
        assert [p.exitcode for p in processes] == [0] * len(WORKERS)
    finally:
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGKILL)
                process.join(timeout=10)

    asyncio.run(check_everything(tmp_path))
    with sqlite3.connect(tmp_path / "vectors.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        for (table,) in conn.execute("SELECT 'vs_fts_' || id FROM vs_partitions").fetchall():
            conn.execute(f"INSERT INTO {table} ({table}) VALUES ('integrity-check')")
    conn.close()


async def test_cached_vectors_follow_writes_from_another_store(tmp_path: Path) -> None:
    """Each store keeps its own cache, as each process does: a write through one must be
    visible to the next search through the other."""
    reader, writer = EmbeddedVectorStore(tmp_path), EmbeddedVectorStore(tmp_path)
    try:
        await writer.ensure_collection(COLLECTION, DIM)
        first = make_doc("w1", "own", 1)
        await writer.upsert(COLLECTION, SHARED, [first], [vector_of(first.id)])
        assert [h.id for h in await reader.search(COLLECTION, SHARED, vector_of(first.id))] \
            == [first.id]
        second = make_doc("w2", "own", 2)
        await writer.upsert(COLLECTION, SHARED, [second], [vector_of(second.id)])
        hits = await reader.search(COLLECTION, SHARED, vector_of(second.id), k=1)
        assert [h.id for h in hits] == [second.id]
        changed = first.model_copy(update={"text": "rewritten"})
        await writer.upsert(COLLECTION, SHARED, [changed], [vector_of(second.id)])
        hits = await reader.search(COLLECTION, SHARED, vector_of(second.id), k=2)
        assert sorted((h.id, h.text) for h in hits) == sorted(
            [(first.id, "rewritten"), (second.id, second.text)])
        assert await writer.delete(COLLECTION, SHARED, [second.id]) == 1
        hits = await reader.search(COLLECTION, SHARED, vector_of(second.id), k=5)
        assert [h.id for h in hits] == [first.id]
    finally:
        await reader.close()
        await writer.close()
