"""Per-message offset bookkeeping: commit only the contiguous prefix of finished offsets.

Each consumed offset is ``start``-ed, then ``finish``-ed when its output is acknowledged.
The committable position is one past the highest offset below which everything is
finished, so messages may finish out of order (concurrent processing within a
partition) without a commit ever skipping unfinished work.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    def __init__(self) -> None:
        self._window: OrderedDict[int, bool] = OrderedDict()
        self._position: int | None = None
        self._committed: int | None = None

    def start(self, offset: int) -> None:
        if self._window and offset <= next(reversed(self._window)):
            raise ValueError(f"offset {offset} started out of order")
        self._window[offset] = False

    def finish(self, offset: int) -> None:
        if offset not in self._window:
            raise KeyError(f"offset {offset} was not started")
        self._window[offset] = True
        while self._window:
            first, done = next(iter(self._window.items()))
            if not done:
                break
            self._window.popitem(last=False)
            self._position = first + 1

    def abandon_from(self, offset: int) -> None:
        """Forget ``offset`` and later ones (they will be fetched again after a seek)."""
        for pending in [o for o in self._window if o >= offset]:
            del self._window[pending]

    @property
    def in_flight(self) -> int:
        return sum(1 for done in self._window.values() if not done)

    def to_commit(self) -> int | None:
        """The position to commit, or None if nothing new is finished."""
        return self._position if self._position != self._committed else None

    def committed(self, position: int) -> None:
        self._committed = position
