"""The embedded vector store: one SQLite file shared safely by threads and worker processes.

Layout (``vectors.sqlite3`` in the store's directory, WAL mode, ``busy_timeout`` set):

* ``vs_collections(name, dim)``: one row per collection;
* ``vs_partitions(id, collection, tenant, generation)``: one row per (collection, tenant) that
  ever held data; ``generation`` is bumped by every write to that partition, in the same
  transaction, and is what keeps the per-process vector cache honest across processes;
* ``vs_documents(collection, tenant, doc_id, text, metadata, vector)``: metadata as JSON, the
  vector as little-endian float32 bytes; every query filters on collection AND tenant;
* ``vs_fts_<partition id>``: an FTS5 table per partition, so BM25 statistics are per tenant,
  as in Weaviate's per-tenant shards.

Each blocking call runs in ``asyncio.to_thread`` on a connection taken from a small pool, so a
connection is used by one thread at a time. Writes use ``BEGIN IMMEDIATE``; reads run in one
transaction (one snapshot). Vector search is brute-force cosine with numpy over the partition's
rows that pass the filters; filters are evaluated in Python with :func:`base.matches`.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from agentfabric.errors import ConfigError, PermanentError, TransientError

from .base import (
    Condition,
    Document,
    Hit,
    MetadataValue,
    StoredDocument,
    canonical_collection,
    check_dim,
    check_search_args,
    check_tenant,
    check_vector,
    keyword_terms,
    matches,
    rank,
)

__all__ = ["EmbeddedVectorStore"]

T = TypeVar("T")
FloatArray = npt.NDArray[np.float32]

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS vs_collections (name TEXT PRIMARY KEY, dim INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS vs_partitions (id INTEGER PRIMARY KEY, collection TEXT NOT NULL, "
    "tenant TEXT NOT NULL, generation INTEGER NOT NULL DEFAULT 0, UNIQUE (collection, tenant))",
    "CREATE TABLE IF NOT EXISTS vs_documents (rowid INTEGER PRIMARY KEY, collection TEXT NOT "
    "NULL, tenant TEXT NOT NULL, doc_id TEXT NOT NULL, text TEXT NOT NULL, metadata TEXT NOT "
    "NULL, vector BLOB NOT NULL, UNIQUE (collection, tenant, doc_id))",
)


@dataclass(frozen=True)
class _Partition:
    """A decoded, immutable snapshot of one (collection, tenant) at ``generation``."""

    id: int
    generation: int
    rowids: dict[int, int]  # rowid -> index
    ids: list[str]
    index: dict[str, int]  # doc id -> index
    texts: list[str]
    metadata: list[dict[str, MetadataValue]]
    unit: FloatArray  # rows L2-normalised


def _fts_query(text: str) -> str | None:
    """An FTS5 OR-query of the text's keyword terms, or None if it has none."""
    return " OR ".join(f'"{w}"' for w in keyword_terms(text)) or None


class EmbeddedVectorStore:
    """A :class:`~tools.vectors.base.VectorStore` in one SQLite file under ``directory``."""

    def __init__(self, directory: Path, *, busy_timeout_ms: int = 30_000,
                 cache_partitions: int = 64) -> None:
        self._path = Path(directory) / "vectors.sqlite3"
        self._busy_timeout_ms = busy_timeout_ms
        self._cache_size = cache_partitions
        self._lock = threading.Lock()
        self._pool: list[sqlite3.Connection] = []
        self._cache: OrderedDict[tuple[str, str], _Partition] = OrderedDict()
        self._dims: dict[str, int] = {}
        self._schema_ready = False
        self._closed = False
        self._pid = os.getpid()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- connections -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout_ms / 1000,
                               isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise ConfigError(f"the vector store at {self._path} is closed")
            if self._pid != os.getpid():  # forked: never touch the parent's connections
                self._pool, self._cache, self._pid = [], OrderedDict(), os.getpid()
            conn = self._pool.pop() if self._pool else None
        try:
            with _translated(self._path):
                if conn is None:
                    conn = self._open()
                if not self._schema_ready:
                    self._create_schema(conn)
            yield conn
        finally:
            if conn is not None:
                with self._lock:
                    if self._closed or conn.in_transaction or self._pid != os.getpid():
                        conn.close()
                    else:
                        self._pool.append(conn)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL does not wait for the busy timeout, so processes opening
        # the store at the same moment take turns on a lock file (flock blocks; no polling).
        with open(self._path.with_name(self._path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._create_schema_locked(conn)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _create_schema_locked(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigError(f"{self._path} cannot use WAL mode (got {mode!r}); put the vector "
                              "store on a local file system")
        with _transaction(conn, immediate=True):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(f"{self._path} has schema version {version}, newer than this "
                                  f"agentfabric's {SCHEMA_VERSION}; upgrade agentfabric")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._schema_ready = True

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._connection() as conn, _translated(self._path):
                return fn(conn)
        return await asyncio.to_thread(call)

    # -- the contract ------------------------------------------------------------------------

    async def ensure_collection(self, name: str, dim: int) -> None:
        collection, dim = canonical_collection(name), check_dim(dim)

        def work(conn: sqlite3.Connection) -> None:
            with _transaction(conn, immediate=True):
                row = conn.execute("SELECT dim FROM vs_collections WHERE name = ?",
                                   (collection,)).fetchone()
                if row is None:
                    conn.execute("INSERT INTO vs_collections (name, dim) VALUES (?, ?)",
                                 (collection, dim))
                elif row[0] != dim:
                    raise ConfigError(f"collection '{collection}' exists with {row[0]}-dimensional "
                                      f"vectors, not {dim}; use another collection name")
            self._dims[collection] = dim
        await self._run(work)

    async def upsert(self, collection: str, tenant: str, documents: Sequence[Document],
                     vectors: Sequence[Sequence[float]]) -> int:
        collection, tenant = canonical_collection(collection), check_tenant(tenant)
        if len(documents) != len(vectors):
            raise PermanentError(f"upsert got {len(documents)} documents but {len(vectors)} "
                                 "vectors; pass one vector per document")
        seen: set[str] = set()
        for doc in documents:
            if doc.id in seen:
                raise PermanentError(f"upsert got document id '{doc.id}' twice in one call")
            seen.add(doc.id)
        if not documents:
            return 0

        def work(conn: sqlite3.Connection) -> int:
            dim = self._dim(conn, collection)
            blobs = [np.asarray(check_vector(v, dim, collection), dtype="<f4").tobytes()
                     for v in vectors]
            with _transaction(conn, immediate=True):
                partition = self._partition_id(conn, collection, tenant, create=True)
                assert partition is not None
                fts = f"vs_fts_{partition}"
                for doc, blob in zip(documents, blobs, strict=True):
                    meta = json.dumps(doc.metadata, sort_keys=True, allow_nan=False)
                    ((rowid,),) = conn.execute(
                        "INSERT INTO vs_documents (collection, tenant, doc_id, text, metadata, "
                        "vector) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, tenant, "
                        "doc_id) DO UPDATE SET text = excluded.text, metadata = "
                        "excluded.metadata, vector = excluded.vector RETURNING rowid",
                        (collection, tenant, doc.id, doc.text, meta, blob)).fetchall()
                    conn.execute(f"DELETE FROM {fts} WHERE rowid = ?", (rowid,))
                    conn.execute(f"INSERT INTO {fts} (rowid, text) VALUES (?, ?)",
                                 (rowid, doc.text))
                conn.execute("UPDATE vs_partitions SET generation = generation + 1 "
                             "WHERE id = ?", (partition,))
            return len(documents)
        return await self._run(work)

    async def search(self, collection: str, tenant: str, vector: Sequence[float], *, k: int = 5,
                     query_text: str | None = None, alpha: float = 1.0,
                     filters: Sequence[Condition] = ()) -> list[Hit]:
        collection, tenant = canonical_collection(collection), check_tenant(tenant)
        check_search_args(k, alpha, query_text)
        conditions = list(filters)

        def work(conn: sqlite3.Connection) -> list[Hit]:
            dim = self._dim(conn, collection)
            query = np.asarray(check_vector(vector, dim, collection), dtype=np.float32)
            with _transaction(conn, immediate=False):
                part = self._snapshot(conn, collection, tenant)
                if part is None or not part.ids:
                    return []
                allowed = [i for i, md in enumerate(part.metadata) if matches(conditions, md)]
                if not allowed:
                    return []
                keyword: dict[str, float] = {}
                if alpha < 1.0:
                    keyword = self._keyword_scores(conn, part, query_text or "", set(allowed))
            vector_scores: dict[str, float] = {}
            if alpha > 0.0:
                sims = part.unit[allowed] @ (query / np.linalg.norm(query))
                vector_scores = {part.ids[i]: float(s) for i, s in zip(allowed, sims, strict=True)}
            return [Hit(id=doc_id, text=part.texts[part.index[doc_id]],
                        metadata=part.metadata[part.index[doc_id]], score=score)
                    for doc_id, score in rank(vector_scores, keyword, alpha, k)]
        return await self._run(work)

    async def delete(self, collection: str, tenant: str, ids: Sequence[str]) -> int:
        collection, tenant = canonical_collection(collection), check_tenant(tenant)
        wanted = list(dict.fromkeys(ids))

        def work(conn: sqlite3.Connection) -> int:
            self._dim(conn, collection)
            deleted = 0
            with _transaction(conn, immediate=True):
                partition = self._partition_id(conn, collection, tenant, create=False)
                if partition is None:
                    return 0
                for doc_id in wanted:
                    for (rowid,) in conn.execute(
                            "DELETE FROM vs_documents WHERE collection = ? AND tenant = ? AND "
                            "doc_id = ? RETURNING rowid", (collection, tenant, doc_id)).fetchall():
                        conn.execute(f"DELETE FROM vs_fts_{partition} WHERE rowid = ?", (rowid,))
                        deleted += 1
                if deleted:
                    conn.execute("UPDATE vs_partitions SET generation = generation + 1 "
                                 "WHERE id = ?", (partition,))
            return deleted
        return await self._run(work)

    async def count(self, collection: str, tenant: str) -> int:
        collection, tenant = canonical_collection(collection), check_tenant(tenant)

        def work(conn: sqlite3.Connection) -> int:
            self._dim(conn, collection)
            row = conn.execute("SELECT COUNT(*) FROM vs_documents WHERE collection = ? AND "
                               "tenant = ?", (collection, tenant)).fetchone()
            return int(row[0])
        return await self._run(work)

    async def get(self, collection: str, tenant: str, ids: Sequence[str]) -> list[StoredDocument]:
        """The stored documents among ``ids`` with their vectors, in the order of ``ids``."""
        collection, tenant = canonical_collection(collection), check_tenant(tenant)

        def work(conn: sqlite3.Connection) -> list[StoredDocument]:
            self._dim(conn, collection)
            found: list[StoredDocument] = []
            with _transaction(conn, immediate=False):
                for doc_id in ids:
                    row = conn.execute(
                        "SELECT text, metadata, vector FROM vs_documents WHERE collection = ? "
                        "AND tenant = ? AND doc_id = ?", (collection, tenant, doc_id)).fetchone()
                    if row is not None:
                        found.append(StoredDocument(
                            id=doc_id, text=row[0], metadata=json.loads(row[1]),
                            vector=np.frombuffer(row[2], dtype="<f4").tolist()))
            return found
        return await self._run(work)

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
            self._cache.clear()
        for conn in pool:
            conn.close()

    # -- helpers (run in worker threads) -----------------------------------------------------

    def _dim(self, conn: sqlite3.Connection, collection: str) -> int:
        dim = self._dims.get(collection)
        if dim is None:
            row = conn.execute("SELECT dim FROM vs_collections WHERE name = ?",
                               (collection,)).fetchone()
            if row is None:
                raise ConfigError(f"collection '{collection}' does not exist; call "
                                  "ensure_collection first")
            dim = self._dims[collection] = int(row[0])
        return dim

    @staticmethod
    def _partition_id(conn: sqlite3.Connection, collection: str, tenant: str, *,
                      create: bool) -> int | None:
        row = conn.execute("SELECT id FROM vs_partitions WHERE collection = ? AND tenant = ?",
                           (collection, tenant)).fetchone()
        if row is not None:
            return int(row[0])
        if not create:
            return None
        cur = conn.execute("INSERT INTO vs_partitions (collection, tenant) VALUES (?, ?)",
                           (collection, tenant))
        partition = int(cur.lastrowid or 0)
        conn.execute(f"CREATE VIRTUAL TABLE vs_fts_{partition} USING fts5(text, tokenize = "
                     "'unicode61 remove_diacritics 2')")
        return partition

    def _snapshot(self, conn: sqlite3.Connection, collection: str,
                  tenant: str) -> _Partition | None:
        """The partition's decoded rows, from the cache unless another writer moved it on."""
        row = conn.execute("SELECT id, generation FROM vs_partitions WHERE collection = ? AND "
                           "tenant = ?", (collection, tenant)).fetchone()
        if row is None:
            return None
        key = (collection, tenant)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and (cached.id, cached.generation) == (row[0], row[1]):
                self._cache.move_to_end(key)
                return cached
        rows = conn.execute("SELECT rowid, doc_id, text, metadata, vector FROM vs_documents "
                            "WHERE collection = ? AND tenant = ? ORDER BY rowid",
                            (collection, tenant)).fetchall()
        dim = self._dims[collection]
        matrix = np.frombuffer(b"".join(r[4] for r in rows), dtype="<f4").reshape(len(rows), dim)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        part = _Partition(
            id=int(row[0]), generation=int(row[1]),
            rowids={int(r[0]): i for i, r in enumerate(rows)}, ids=[r[1] for r in rows],
            index={r[1]: i for i, r in enumerate(rows)},
            texts=[r[2] for r in rows], metadata=[json.loads(r[3]) for r in rows],
            unit=(matrix / np.where(norms == 0, 1, norms)).astype(np.float32))
        with self._lock:
            self._cache[key] = part
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return part

    @staticmethod
    def _keyword_scores(conn: sqlite3.Connection, part: _Partition, text: str,
                        allowed: set[int]) -> dict[str, float]:
        """BM25 (higher is better) of the partition's documents that match the text."""
        query = _fts_query(text)
        if query is None:
            return {}
        scores: dict[str, float] = {}
        for rowid, score in conn.execute(
                f"SELECT rowid, -bm25(vs_fts_{part.id}) FROM vs_fts_{part.id} "
                f"WHERE vs_fts_{part.id} MATCH ?", (query,)):
            index = part.rowids.get(int(rowid))
            if index is not None and index in allowed:
                scores[part.ids[index]] = float(score)
        return scores


@contextmanager
def _transaction(conn: sqlite3.Connection, *, immediate: bool) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """sqlite3 errors as agentfabric errors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        message = str(exc)
        if "unable to open" in message:
            raise ConfigError(f"cannot open the vector store {path}: {message}; check the "
                              "directory exists and is writable") from exc
        raise TransientError(f"the vector store {path} is unavailable ({message}); "
                             "try again") from exc
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"the vector store {path} is unusable ({exc}); restore or remove "
                          "the file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot use the vector store directory {path.parent}: {exc}") from exc
