"""Knowledge bases: a vector store and an embedder together, as lookup steps and
``agentfabric kb`` use them (search by text, ingest documents and files)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from agentfabric.errors import ConfigError

from .vectors import Condition, Document, Embedder, Hit, VectorStore, chunk_text

__all__ = ["KnowledgeBase", "read_documents"]


class KnowledgeBase:
    def __init__(self, store: VectorStore, embedder: Embedder) -> None:
        self.store = store
        self.embedder = embedder

    async def search(self, collection: str, tenant: str, query: str, *, k: int = 5,
                     alpha: float = 1.0, filters: Sequence[Condition] = ()) -> list[Hit]:
        [vector] = await self.embedder.embed([query])
        return await self.store.search(collection, tenant, vector, k=k,
                                       query_text=query if alpha < 1 else None, alpha=alpha,
                                       filters=filters)

    async def ingest(self, collection: str, tenant: str, documents: Sequence[Document], *,
                     batch_size: int = 64,
                     progress: Callable[[int], None] | None = None) -> int:
        """Embed and upsert ``documents`` in batches; ``progress`` gets each batch's size."""
        await self.store.ensure_collection(collection, self.embedder.dim)
        written = 0
        for start in range(0, len(documents), batch_size):
            batch = list(documents[start:start + batch_size])
            vectors = await self.embedder.embed([d.text for d in batch])
            written += await self.store.upsert(collection, tenant, batch, vectors)
            if progress is not None:
                progress(len(batch))
        return written

    async def close(self) -> None:
        await self.store.close()


def read_documents(paths: Sequence[Path], *, max_words: int = 120,
                   overlap: int = 20) -> list[Document]:
    """``.jsonl`` files hold documents (``id``, ``text``, ``metadata``); any other file is
    text, chunked into documents ``<file stem>-<n>`` with the file name as ``source``."""
    documents: list[Document] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path} ({exc})") from exc
        if path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    documents.append(Document.model_validate(json.loads(line)))
                except (json.JSONDecodeError, ValidationError) as exc:
                    raise ConfigError(f"{path}:{number}: not a document ({exc})") from exc
            continue
        for number, chunk in enumerate(chunk_text(text, max_words=max_words, overlap=overlap)):
            documents.append(Document(id=f"{path.stem}-{number}", text=chunk,
                                      metadata={"source": path.name}))
    return documents
