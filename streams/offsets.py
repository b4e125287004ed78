"""Per-partition offset bookkeeping: commit only the contiguous prefix of finished offsets.

Each consumed offset is ``start``-ed in offset order, then ``finish``-ed when its output is
acknowledged. Offsets may finish in any order (many records of a partition are in flight at
once); the committable position is one past the highest offset below which everything is
finished, so a commit never skips unfinished work and a crash redelivers only what was not
finished.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["PartitionOffsets"]


class PartitionOffsets:
    def __init__(self) -> None:
        self._window: OrderedDict[int, bool] = OrderedDict()
        self._position: int | None = None
        self._committed: int | None = None
        self._unfinished = 0

    def start(self, offset: int) -> None:
        if self._window and offset <= next(reversed(self._window)):
            raise ValueError(f"offset {offset} started out of order")
        if not self._window and self._position is not None and offset < self._position:
            raise ValueError(f"offset {offset} is below the finished position {self._position}")
        self._window[offset] = False
        self._unfinished += 1

    def finish(self, offset: int) -> None:
        if self._window.get(offset) is not False:
            raise KeyError(f"offset {offset} was not started or is already finished")
        self._window[offset] = True
        self._unfinished -= 1
        while self._window:
            first, done = next(iter(self._window.items()))
            if not done:
                break
            self._window.popitem(last=False)
            self._position = first + 1

    @property
    def in_flight(self) -> int:
        """Started and not finished."""
        return self._unfinished

    @property
    def position(self) -> int | None:
        """One past the contiguous finished prefix (None before anything finished)."""
        return self._position

    @property
    def next_to_finish(self) -> int | None:
        """The lowest started offset not yet finished, else the position (None before
        anything started)."""
        return next(iter(self._window), self._position)

    def to_commit(self) -> int | None:
        """The position to commit, or None if nothing new is finished."""
        return self._position if self._position != self._committed else None

    def committed(self, position: int) -> None:
        self._committed = position
