"""The vector-store contract: documents, hits, filter conditions and the ``VectorStore`` protocol.

This module owns what every backend must agree on, so the embedded (SQLite) and Weaviate
backends answer the same questions the same way:

* names: collections match ``^[A-Za-z][A-Za-z0-9_]{0,63}$`` (the first letter is capitalised, as
  Weaviate does, so ``docs`` and ``Docs`` name one collection; a bad name is a ``ConfigError``),
  tenants match ``^[a-z][a-z0-9_-]{0,63}$`` (a bad one is a ``PermanentError``);
* metadata keys match ``^[a-z][A-Za-z0-9_]{0,63}$`` and are not ``id``, ``doc_id``, ``text``
  or ``vector``; values are ``str``, ``int``, ``float`` (finite) or ``bool``, and a key keeps one
  kind (string, number or boolean) within a collection (Weaviate's schema enforces it);
* filters (:func:`matches`): a list of :class:`Condition` ANDed together. Values compare within a
  kind only: numbers with numbers (``int`` and ``float`` alike), strings with strings, booleans
  with booleans. A condition on a missing field, or across kinds, never matches, except ``ne``,
  which then matches;
* keyword search matches a query's terms (:func:`keyword_terms`: lower-cased runs of letters and
  digits, without Lucene's English stop words, like Weaviate's default ``en`` preset) in the
  document text, any term sufficing (BM25 with OR);
* scores: higher is better; cosine similarity for pure vector search (``alpha=1``), BM25 for pure
  keyword search (``alpha=0``), and for hybrid search the relative-score fusion of
  :func:`relative_score_fusion` (each list min-max normalised to [0, 1], a list whose scores are
  all equal normalised to 1, then ``alpha * vector + (1 - alpha) * keyword``, over each side's
  best ``max(k, HYBRID_CANDIDATES)``); results come best first, ties in id order (:func:`rank`);
* vectors: finite numbers, not all zero, of the collection's dimension (else ``PermanentError``
  naming both dimensions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentfabric.errors import ConfigError, PermanentError

__all__ = [
    "COLLECTION_PATTERN",
    "HYBRID_CANDIDATES",
    "METADATA_KEY_PATTERN",
    "RESERVED_KEYS",
    "STOPWORDS",
    "TENANT_PATTERN",
    "Condition",
    "Document",
    "Hit",
    "MetadataValue",
    "StoredDocument",
    "VectorStore",
    "canonical_collection",
    "check_dim",
    "check_search_args",
    "check_tenant",
    "check_vector",
    "keyword_terms",
    "matches",
    "rank",
    "relative_score_fusion",
    "top_k",
]

MetadataValue = str | int | float | bool

COLLECTION_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
TENANT_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
METADATA_KEY_PATTERN = re.compile(r"^[a-z][A-Za-z0-9_]{0,63}$")
HYBRID_CANDIDATES = 100
"""Each side of a hybrid search contributes its best ``max(k, HYBRID_CANDIDATES)`` results."""
RESERVED_KEYS = frozenset({"id", "doc_id", "text", "vector"})
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with"
})
_TERM = re.compile(r"[^\W_]+")


def _check_scalar(value: object, what: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value}")


class Document(BaseModel):
    """A text with an id unique in its (collection, tenant) and flat scalar metadata."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    text: str
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _keys_and_values(cls, metadata: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        for key, value in metadata.items():
            if not METADATA_KEY_PATTERN.match(key) or key in RESERVED_KEYS:
                raise ValueError(
                    f"metadata key {key!r} must match {METADATA_KEY_PATTERN.pattern} and not be "
                    f"one of {sorted(RESERVED_KEYS)}")
            _check_scalar(value, f"metadata value of {key!r}")
        return metadata


class StoredDocument(Document):
    """A document as stored, with its vector."""

    vector: list[float]


class Hit(BaseModel):
    """One search result; ``score`` is higher-is-better (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    id: str
    text: str
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    score: float


Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in"]


class Condition(BaseModel):
    """``metadata[field] <op> value``; ``in`` takes a non-empty list of scalars."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    field: str
    op: Op
    value: MetadataValue | list[MetadataValue]

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        if not METADATA_KEY_PATTERN.match(self.field):
            raise ValueError(f"field {self.field!r} must match {METADATA_KEY_PATTERN.pattern}")
        if self.op == "in":
            if not isinstance(self.value, list) or not self.value:
                raise ValueError("op 'in' takes a non-empty list of values")
            for item in self.value:
                _check_scalar(item, "value")
            return self
        if isinstance(self.value, list):
            raise ValueError(f"op {self.op!r} takes one value, not a list")
        _check_scalar(self.value, "value")
        if self.op in ("gt", "gte", "lt", "lte") and isinstance(self.value, bool):
            raise ValueError(f"op {self.op!r} orders numbers or strings, not booleans")
        return self


@runtime_checkable
class VectorStore(Protocol):
    """Multi-tenant vector storage with keyword, vector and hybrid search (async)."""

    async def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection for ``dim``-dimensional vectors unless it exists with that dim."""
        ...

    async def upsert(self, collection: str, tenant: str, documents: Sequence[Document],
                     vectors: Sequence[Sequence[float]]) -> int:
        """Insert or replace ``documents`` (by id) with their vectors; returns how many."""
        ...

    async def search(self, collection: str, tenant: str, vector: Sequence[float], *, k: int = 5,
                     query_text: str | None = None, alpha: float = 1.0,
                     filters: Sequence[Condition] = ()) -> list[Hit]:
        """The best ``k`` documents of the tenant, best first."""
        ...

    async def delete(self, collection: str, tenant: str, ids: Sequence[str]) -> int:
        """Delete documents by id; returns how many existed."""
        ...

    async def count(self, collection: str, tenant: str) -> int:
        """How many documents the tenant holds in the collection."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def canonical_collection(name: str) -> str:
    """The collection's stored name (first letter capitalised); ``ConfigError`` if invalid."""
    if not isinstance(name, str) or not COLLECTION_PATTERN.match(name):
        raise ConfigError(f"collection name {name!r} is invalid: it must match "
                          f"{COLLECTION_PATTERN.pattern} (a letter, then up to 63 letters, "
                          "digits or underscores)")
    return name[0].upper() + name[1:]


def check_tenant(tenant: str) -> str:
    """``tenant`` if valid, else ``PermanentError``."""
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise PermanentError(f"tenant name {tenant!r} is invalid: it must match "
                             f"{TENANT_PATTERN.pattern} (a lower-case letter, then up to 63 "
                             "lower-case letters, digits, '_' or '-')")
    return tenant


def check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65536:
        raise ConfigError(f"vector dimension {dim!r} is invalid: use an integer from 1 to 65536")
    return dim


def check_vector(vector: Sequence[float], dim: int, collection: str) -> list[float]:
    """``vector`` as floats if it is finite, non-zero and ``dim`` long; else ``PermanentError``."""
    values = [float(x) for x in vector]
    if len(values) != dim:
        raise PermanentError(f"vector has {len(values)} dimensions but collection "
                             f"'{collection}' holds {dim}-dimensional vectors")
    if not all(math.isfinite(x) for x in values):
        raise PermanentError("vector has a NaN or infinite component")
    if not any(values):
        raise PermanentError("vector is all zeros: cosine similarity is undefined for it")
    return values


def check_search_args(k: int, alpha: float, query_text: str | None) -> None:
    """``PermanentError`` unless ``k >= 1``, ``0 <= alpha <= 1`` and text is given when needed."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PermanentError(f"k must be a positive integer, not {k!r}")
    if not 0.0 <= alpha <= 1.0:
        raise PermanentError(f"alpha must be between 0 (keyword) and 1 (vector), not {alpha}")
    if alpha < 1.0 and not (query_text and query_text.strip()):
        raise PermanentError(f"alpha {alpha} includes keyword search, which needs query_text")


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "str"


def _ordered(op: str, a: Any, b: Any) -> bool:
    if op == "gt":
        return bool(a > b)
    if op == "gte":
        return bool(a >= b)
    if op == "lt":
        return bool(a < b)
    return bool(a <= b)


def _compare(op: str, actual: MetadataValue, expected: MetadataValue) -> bool:
    """One scalar comparison; values of different kinds are never equal or ordered."""
    same = _kind(actual) == _kind(expected)
    if op == "eq":
        return same and actual == expected
    if op == "ne":
        return not (same and actual == expected)
    if not same or isinstance(actual, bool):
        return False
    return _ordered(op, actual, expected)


def _condition_matches(condition: Condition, metadata: Mapping[str, MetadataValue]) -> bool:
    if condition.field not in metadata:
        return condition.op == "ne"
    actual = metadata[condition.field]
    if condition.op == "in":
        assert isinstance(condition.value, list)
        return any(_compare("eq", actual, v) for v in condition.value)
    assert not isinstance(condition.value, list)
    return _compare(condition.op, actual, condition.value)


def matches(filters: Sequence[Condition], metadata: Mapping[str, MetadataValue]) -> bool:
    """Whether ``metadata`` satisfies every condition (the reference filter semantics)."""
    return all(_condition_matches(c, metadata) for c in filters)


def keyword_terms(text: str) -> list[str]:
    """The distinct terms keyword search looks for in ``text``, in order."""
    return list(dict.fromkeys(t for t in _TERM.findall(text.lower()) if t not in STOPWORDS))


def _normalised(scores: Mapping[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    if high == low:
        return dict.fromkeys(scores, 1.0)
    return {key: (s - low) / (high - low) for key, s in scores.items()}


def relative_score_fusion(vector_scores: Mapping[str, float], keyword_scores: Mapping[str, float],
                          alpha: float) -> dict[str, float]:
    """Weaviate's ``relativeScoreFusion``: min-max normalise each list, then weight and add."""
    fused: dict[str, float] = {}
    for key, score in _normalised(vector_scores).items():
        fused[key] = alpha * score
    for key, score in _normalised(keyword_scores).items():
        fused[key] = fused.get(key, 0.0) + (1.0 - alpha) * score
    return fused


def top_k(scores: Mapping[str, float], k: int) -> list[str]:
    """The keys of the ``k`` best scores, best first, ties broken by key (document id)."""
    return sorted(scores, key=lambda key: (-scores[key], key))[:k]


def rank(vector_scores: Mapping[str, float], keyword_scores: Mapping[str, float], alpha: float,
         k: int) -> list[tuple[str, float]]:
    """The best ``k`` (id, score) pairs of a search with ``alpha`` over both sides' scores."""
    if alpha >= 1.0:
        scores = vector_scores
    elif alpha <= 0.0:
        scores = keyword_scores
    else:
        window = max(k, HYBRID_CANDIDATES)
        scores = relative_score_fusion(
            {key: vector_scores[key] for key in top_k(vector_scores, window)},
            {key: keyword_scores[key] for key in top_k(keyword_scores, window)}, alpha)
    return [(key, scores[key]) for key in top_k(scores, k)]
