"""Semantic lookup: the vector-store contract, its embedded and Weaviate backends, embedders
and chunking.

``WeaviateVectorStore`` is imported on first use (``tools.vectors.WeaviateVectorStore``), so
code that only uses the embedded store never loads the Weaviate client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentfabric.errors import ConfigError

from .base import Condition, Document, Hit, StoredDocument, VectorStore
from .chunking import chunk_text
from .embedded import EmbeddedVectorStore
from .embedders import Embedder, MiniLMEmbedder, OpenAIEmbedder

if TYPE_CHECKING:
    from .weaviate_store import WeaviateVectorStore

__all__ = [
    "Condition",
    "Document",
    "EmbeddedVectorStore",
    "Embedder",
    "Hit",
    "MiniLMEmbedder",
    "OpenAIEmbedder",
    "StoredDocument",
    "VectorStore",
    "WeaviateVectorStore",
    "chunk_text",
]


def __getattr__(name: str) -> Any:
    if name == "WeaviateVectorStore":
        try:
            from .weaviate_store import WeaviateVectorStore
        except ImportError as exc:
            if not (exc.name or "").startswith("weaviate"):
                raise
            raise ConfigError("vector_store=weaviate needs `pip install "
                              "'agentfabric[weaviate]'` (weaviate-client is not installed)"
                              ) from exc
        return WeaviateVectorStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
