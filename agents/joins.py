"""Join state of parallel fan-outs: which branches of a fan-out have arrived.

``arrive`` records a branch's payload under the fan-out's key (a redelivered branch
overwrites its own entry, so it counts once) and returns every branch's payload exactly to
the one branch that completes the join: that branch emits the join step's message. The
emitter is remembered, so a redelivery of the completing branch emits again (and the
idempotent step downstream absorbs the repeat) while the other branches stay silent.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["JoinStore", "MemoryJoinStore"]


class JoinStore(Protocol):
    async def arrive(self, key: str, branch: str, payload: str, total: int,
                     ) -> dict[str, str] | None:
        """Record ``branch``; all payloads if this branch completes the join, else None."""


class MemoryJoinStore:
    """The contract in memory (unit tests, replays)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, dict[str, str]] = {}
        self.emitters: dict[str, str] = {}

    async def arrive(self, key: str, branch: str, payload: str, total: int,
                     ) -> dict[str, str] | None:
        arrived = self.arrivals.setdefault(key, {})
        arrived[branch] = payload
        if len(arrived) < total:
            return None
        if self.emitters.setdefault(key, branch) != branch:
            return None
        return dict(arrived)
