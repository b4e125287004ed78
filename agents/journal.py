"""Durable actions inside a step: every model call, tool call and lookup is written to a
journal as it completes, so a step that runs again (after a crash, a lost lease or a
transient failure) is answered from the journal instead of asking the model the same
decision twice or repeating a completed tool call. Only the call in flight at the moment of
a crash can happen twice, and it carries the same idempotency key.

The engine knows this protocol; the worker wires the Redis journal (``streams.journal``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from schemas.models import canonical_json

__all__ = ["Journal", "MemoryJournal", "request_digest"]


class Journal(Protocol):
    async def load(self, key: str) -> list[dict[str, Any]]:
        """The entries journaled under ``key``, oldest first."""

    async def append(self, key: str, entry: dict[str, Any]) -> None: ...

    async def truncate(self, key: str, keep: int) -> None:
        """Keep only the first ``keep`` entries (the rest no longer match the run)."""


class MemoryJournal:
    """The contract in memory (unit tests)."""

    def __init__(self) -> None:
        self.entries: dict[str, list[dict[str, Any]]] = {}

    async def load(self, key: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries.get(key, [])]

    async def append(self, key: str, entry: dict[str, Any]) -> None:
        self.entries.setdefault(key, []).append(dict(entry))

    async def truncate(self, key: str, keep: int) -> None:
        del self.entries.setdefault(key, [])[keep:]


def request_digest(*parts: Any) -> str:
    """A short stable digest of what a call asked for (to check a journaled answer fits)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:32]
