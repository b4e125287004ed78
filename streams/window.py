"""One partition's window of records in flight: key-ordered concurrency, bounded.

Up to ``limit`` records of a partition are in progress at once. Records with the same key
(a run id) run one after another in offset order; records with different keys overlap.
Fetched records beyond the limit wait in a bounded backlog (``backlog`` records, plus at
most one poll) ready to start the moment a slot frees; once the backlog is that long the
window is ``full`` and the consumer pauses the partition, so nothing is buffered without
bound and a steady stream does not pause and refetch on every record. Offsets
finish in any order and ``offsets.to_commit()`` is the end of the contiguous finished prefix
(the design of Confluent Parallel Consumer's key-ordered mode).

A record's ``work`` returns True once its output is acknowledged (its offset may be
committed) or False if it was abandoned (the window is closing): an abandoned offset is
never finished, so no commit passes it and the next owner of the partition runs it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import ConsumerRecord

from .offsets import PartitionOffsets

__all__ = ["PartitionWindow"]

log = logging.getLogger(__name__)

Work = Callable[[ConsumerRecord, "PartitionWindow"], Awaitable[bool]]


class PartitionWindow:
    def __init__(self, limit: int, work: Work,
                 on_change: Callable[[], None] | None = None, backlog: int = 0) -> None:
        if limit < 1:
            raise ValueError("a window needs room for at least one record")
        self.limit = limit
        self.backlog_limit = backlog
        self.offsets = PartitionOffsets()
        self.closed = False
        self._work = work
        self._on_change = on_change
        self._backlog: deque[ConsumerRecord] = deque()
        self._tails: dict[bytes, asyncio.Task[bool]] = {}
        self._tasks: set[asyncio.Task[bool]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def waiting(self) -> int:
        """Fetched records not started yet."""
        return len(self._backlog)

    @property
    def full(self) -> bool:
        """True while the partition should not be fetched (pause it)."""
        return len(self._tasks) >= self.limit and len(self._backlog) >= self.backlog_limit

    def offer(self, records: Iterable[ConsumerRecord]) -> None:
        """Take fetched records (in offset order) and start as many as the window allows."""
        if self.closed:
            return
        self._backlog.extend(records)
        self._pump()

    def _pump(self) -> None:
        while self._backlog and len(self._tasks) < self.limit and not self.closed:
            self._start(self._backlog.popleft())

    def _start(self, record: ConsumerRecord) -> None:
        self.offsets.start(record.offset)
        key = record.key
        before = self._tails.get(key) if key is not None else None
        task = asyncio.create_task(self._run(record, before))
        if key is not None:
            self._tails[key] = task
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(record, done))

    async def _run(self, record: ConsumerRecord, before: asyncio.Task[bool] | None) -> bool:
        if before is not None and not before.done():
            await asyncio.wait((before,))  # same key: strictly after the earlier record
        if before is not None and not self._succeeded(before):
            return False  # the earlier record of this key was abandoned: so is this one
        return await self._work(record, self)

    @staticmethod
    def _succeeded(task: asyncio.Task[bool]) -> bool:
        return not task.cancelled() and task.exception() is None and task.result()

    def _finished(self, record: ConsumerRecord, task: asyncio.Task[bool]) -> None:
        self._tasks.discard(task)
        if record.key is not None and self._tails.get(record.key) is task:
            del self._tails[record.key]
        if self._succeeded(task):
            self.offsets.finish(record.offset)
        elif not task.cancelled() and task.exception() is not None:
            log.error("a record of %s[%d]@%d failed outside its pipeline; it stays "
                      "uncommitted", record.topic, record.partition, record.offset,
                      exc_info=task.exception())
        if not self.closed:
            self._pump()
            if self._on_change is not None:
                self._on_change()

    async def close(self, timeout_s: float) -> int:
        """Take nothing more; wait up to ``timeout_s`` for the records in flight, then cancel
        the rest (left uncommitted). Returns how many were abandoned."""
        self.closed = True
        self._backlog.clear()
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)
