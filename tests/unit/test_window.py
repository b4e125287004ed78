"""One partition's window: key-ordered concurrency, the limit and its backlog, contiguous-prefix
offsets, and closing with records in flight. Work is driven by futures the test resolves;
every wait is on a signal with a deadline, never a sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import pytest
from aiokafka.structs import ConsumerRecord

from streams.window import PartitionWindow

pytestmark = pytest.mark.timeout(20)

WAIT_S = 5.0  # deadline of one wait on a condition (they hold in microseconds)


def record(offset: int, key: bytes | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic="af.wf.step", partition=0, offset=offset, timestamp=0,
                          timestamp_type=0, key=key, value=b"v", checksum=None,
                          serialized_key_size=1, serialized_value_size=1, headers=())


def records(keys: Iterable[bytes | None], first: int = 0) -> list[ConsumerRecord[bytes, bytes]]:
    return [record(first + i, key) for i, key in enumerate(keys)]


class Harness:
    """The work function of a window: each offset waits on a future the test resolves
    (``finish``), and every start, end and window change is signalled."""

    def __init__(self) -> None:
        self.futures: dict[int, asyncio.Future[bool]] = {}
        self.events: list[tuple[str, int]] = []  # ("start" | "end" | "cancelled", offset)
        self.running: set[int] = set()
        self.peak = 0
        self.closed_at_end: dict[int, bool] = {}
        self.changes = 0
        self.full_at_change: list[bool] = []
        self.window: PartitionWindow | None = None
        self._signal = asyncio.Event()

    def make(self, limit: int, backlog: int = 0) -> PartitionWindow:
        self.window = PartitionWindow(limit, self.work, on_change=self.on_change,
                                      backlog=backlog)
        return self.window

    def _future(self, offset: int) -> asyncio.Future[bool]:
        if offset not in self.futures:
            self.futures[offset] = asyncio.get_running_loop().create_future()
        return self.futures[offset]

    async def work(self, rec: ConsumerRecord[bytes, bytes], window: PartitionWindow) -> bool:
        assert window is self.window
        self.events.append(("start", rec.offset))
        self.running.add(rec.offset)
        self.peak = max(self.peak, len(self.running))
        self._signal.set()
        try:
            ok = await self._future(rec.offset)
        except asyncio.CancelledError:
            self.events.append(("cancelled", rec.offset))
            raise
        finally:
            self.running.discard(rec.offset)
            self._signal.set()
        self.events.append(("end", rec.offset))
        self.closed_at_end[rec.offset] = window.closed
        return ok

    def on_change(self) -> None:
        assert self.window is not None
        self.changes += 1
        self.full_at_change.append(self.window.full)
        self._signal.set()

    def finish(self, offset: int, ok: bool = True) -> None:
        self._future(offset).set_result(ok)

    def runs(self, offset: int, *, alone: bool = False) -> Callable[[], bool]:
        """A condition: ``offset`` is running (the only one, with ``alone``)."""
        return lambda: (self.running == {offset}) if alone else offset in self.running

    def started(self) -> list[int]:
        return [offset for what, offset in self.events if what == "start"]

    async def until(self, holds: Callable[[], bool], what: str) -> None:
        """Wait for ``holds()`` to become true, re-checking at every signal, up to WAIT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while not holds():
            self._signal.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for: {what} (events {self.events})")
            try:
                await asyncio.wait_for(self._signal.wait(), remaining)
            except TimeoutError:
                raise AssertionError(f"timed out waiting for: {what} "
                                     f"(events {self.events})") from None

    async def finished(self, offset: int) -> None:
        """Wait until the window has accounted for ``offset``'s task ending."""
        await self.until(lambda: offset not in self.running
                         and self.changes >= self._ends(), f"offset {offset} accounted for")

    def _ends(self) -> int:
        return sum(1 for what, _ in self.events if what in ("end", "cancelled"))


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:  # nothing outlives the test: resolve what is left, close the window
        for future in h.futures.values():
            if not future.done():
                future.set_result(True)
        if h.window is not None and not h.window.closed:
            await h.window.close(WAIT_S)


async def test_out_of_order_completion_commits_only_the_contiguous_prefix(
        harness: Harness) -> None:
    window = harness.make(limit=10)
    window.offer(records([b"a", b"b", b"c", b"d", b"e"]))
    await harness.until(lambda: len(harness.running) == 5, "all five running")
    assert window.offsets.to_commit() is None

    expected = {3: None, 1: None, 4: None, 0: 2, 2: 5}
    for offset, position in expected.items():
        harness.finish(offset)
        await harness.finished(offset)
        assert window.offsets.to_commit() == position, (offset, position)
        if position is not None:
            window.offsets.committed(position)
            assert window.offsets.to_commit() is None
    assert window.offsets.position == 5
    assert window.offsets.in_flight == 0
    assert window.in_flight == 0
    assert not window.full


async def test_one_key_runs_in_offset_order_and_keys_overlap(harness: Harness) -> None:
    window = harness.make(limit=10)
    window.offer(records([b"a", b"a", b"b", b"a", b"c"]))
    # 0 (a), 2 (b), 4 (c) run at once; 1 and 3 (a) wait for 0
    await harness.until(lambda: harness.running == {0, 2, 4}, "the head of every key running")
    assert harness.started() == [0, 2, 4]
    assert window.in_flight == 5, "a record waiting for its key still holds a slot"

    harness.finish(2)
    harness.finish(4)
    await harness.finished(4)
    await harness.finished(2)
    assert 1 not in harness.running, "the second record of a key started before the first ended"

    harness.finish(0)
    await harness.until(lambda: harness.running == {1}, "offset 1 after offset 0")
    assert 3 not in harness.running
    harness.finish(1)
    await harness.until(lambda: harness.running == {3}, "offset 3 after offset 1")
    harness.finish(3)
    await harness.finished(3)

    key_a = [(what, offset) for what, offset in harness.events if offset in (0, 1, 3)]
    assert key_a == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                     ("start", 3), ("end", 3)]
    assert window.offsets.to_commit() == 5


async def test_different_keys_reach_the_limit_of_concurrency(harness: Harness) -> None:
    n = 8
    window = harness.make(limit=n)
    window.offer(records([f"k{i}".encode() for i in range(n)]))
    await harness.until(lambda: len(harness.running) == n, f"{n} running at once")
    assert harness.peak == n
    assert window.full, "a window with every slot taken must pause its partition"
    for offset in range(n):
        harness.finish(offset)
    await harness.until(lambda: window.in_flight == 0, "all finished")
    assert window.offsets.to_commit() == n


async def test_records_without_a_key_overlap(harness: Harness) -> None:
    window = harness.make(limit=4)
    window.offer(records([None, None, None]))
    await harness.until(lambda: len(harness.running) == 3, "keyless records run at once")
    for offset in (2, 0, 1):
        harness.finish(offset)
    await harness.until(lambda: window.in_flight == 0, "all finished")
    assert window.offsets.to_commit() == 3


async def test_the_limit_holds_a_backlog_and_drains_it(harness: Harness) -> None:
    window = harness.make(limit=3)
    window.offer(records([b"a", b"b", b"c", b"d", b"e"]))
    await harness.until(lambda: len(harness.running) == 3, "three running")
    assert harness.started() == [0, 1, 2]
    assert (window.in_flight, window.waiting, window.full) == (3, 2, True)

    harness.finish(0)
    await harness.until(lambda: harness.running == {1, 2, 3}, "offset 3 taken from the backlog")
    assert harness.changes == 1
    assert (window.in_flight, window.waiting, window.full) == (3, 1, True)

    harness.finish(1)
    await harness.until(lambda: harness.running == {2, 3, 4}, "offset 4 taken from the backlog")
    assert harness.changes == 2
    assert (window.in_flight, window.waiting) == (3, 0)
    assert window.full, "the backlog is empty but every slot is taken"

    harness.finish(2)
    await harness.finished(2)
    assert harness.changes == 3
    assert (window.in_flight, window.waiting, window.full) == (2, 0, False)
    # what the consumer saw at each change: pause until the third, then resume
    assert harness.full_at_change == [True, True, False]
    assert harness.peak == 3, "more records ran than the window allows"

    window.offer(records([b"f", b"g"], first=5))  # the resumed fetch fills it again
    await harness.until(lambda: harness.running == {3, 4, 5}, "offset 5 started at once")
    assert (window.in_flight, window.waiting, window.full) == (3, 1, True)
    for offset in (3, 4, 5, 6):
        await harness.until(harness.runs(offset), f"offset {offset} running")
        harness.finish(offset)
    await harness.until(lambda: window.in_flight == 0, "all finished")
    assert window.offsets.to_commit() == 7
    assert harness.peak == 3


async def test_a_backlog_bound_keeps_fetching_until_it_is_reached(harness: Harness) -> None:
    window = harness.make(limit=2, backlog=2)
    window.offer(records([b"a", b"b", b"c"]))
    await harness.until(lambda: len(harness.running) == 2, "two running")
    assert (window.in_flight, window.waiting, window.full) == (2, 1, False)
    window.offer(records([b"d"], first=3))
    assert (window.waiting, window.full) == (2, True), "backlog at its bound: pause"
    harness.finish(0)
    await harness.until(lambda: harness.running == {1, 2}, "offset 2 from the backlog")
    assert (window.waiting, window.full) == (1, False), "room in the backlog: resume"
    for offset in (1, 2, 3):
        await harness.until(harness.runs(offset), f"offset {offset} running")
        harness.finish(offset)
    await harness.until(lambda: window.in_flight == 0, "all finished")
    assert window.offsets.to_commit() == 4
    assert harness.peak == 2


async def test_a_full_backlog_of_one_key_keeps_the_window_full(harness: Harness) -> None:
    """Records waiting for their key hold slots: the window pauses instead of growing."""
    window = harness.make(limit=2)
    window.offer(records([b"a", b"a", b"a"]))
    await harness.until(lambda: harness.running == {0}, "the first record of the key")
    assert (window.in_flight, window.waiting, window.full) == (2, 1, True)
    for offset in (0, 1, 2):
        await harness.until(harness.runs(offset, alone=True), f"offset {offset} alone")
        harness.finish(offset)
    await harness.until(lambda: window.in_flight == 0, "all finished")
    assert harness.started() == [0, 1, 2]
    assert window.offsets.to_commit() == 3


async def test_an_abandoned_record_is_never_committed(harness: Harness) -> None:
    window = harness.make(limit=5)
    window.offer(records([b"a", b"b", b"c"]))
    await harness.until(lambda: len(harness.running) == 3, "three running")
    harness.finish(0)
    await harness.finished(0)
    assert window.offsets.to_commit() == 1
    window.offsets.committed(1)

    harness.finish(1, ok=False)  # abandoned: its output was not acknowledged
    harness.finish(2)
    await harness.finished(1)
    await harness.finished(2)
    assert window.offsets.to_commit() is None, "a commit passed an abandoned record"
    assert window.offsets.position == 1
    assert window.offsets.in_flight == 1
    assert window.in_flight == 0, "the abandoned record still holds a slot"


async def test_a_work_function_that_raises_leaves_its_offset_uncommitted(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    window = harness.make(limit=5)
    window.offer(records([b"a", b"b"]))
    await harness.until(lambda: len(harness.running) == 2, "two running")
    harness.futures[0].set_exception(RuntimeError("boom"))
    harness.finish(1)
    await harness.until(lambda: window.in_flight == 0, "both ended")
    assert window.offsets.to_commit() is None
    assert "failed outside its pipeline" in caplog.text


async def test_close_commits_what_finished_and_abandons_the_rest(harness: Harness) -> None:
    window = harness.make(limit=6)
    # 0 a: finishes during close   1 b: gives up (returns False) during close
    # 2 c: finishes during close   3 b: behind the abandoned 1, must not run
    # 4 d: hangs past the timeout  5 d: behind the hanging 4   6 e: in the backlog
    window.offer(records([b"a", b"b", b"c", b"b", b"d", b"d", b"e"]))
    await harness.until(lambda: harness.running == {0, 1, 2, 4}, "heads of keys running")
    assert window.waiting == 1

    timeout_s = 0.5
    closing = asyncio.create_task(window.close(timeout_s))
    harness.finish(0)
    harness.finish(1, ok=False)
    harness.finish(2)
    started = asyncio.get_running_loop().time()
    abandoned = await asyncio.wait_for(closing, timeout_s + WAIT_S)
    elapsed = asyncio.get_running_loop().time() - started

    assert elapsed >= timeout_s * 0.9, "close did not wait for the record in flight"
    assert all(harness.closed_at_end[o] for o in (0, 1, 2)), "they ended before close began"
    assert abandoned == 2, "the hanging record and the one behind it are cancelled"
    assert ("cancelled", 4) in harness.events
    assert harness.started() == [0, 1, 2, 4], "a record behind an abandoned one ran"
    assert window.waiting == 0
    assert window.in_flight == 0
    assert window.offsets.to_commit() == 1, "only the prefix before the abandoned record"
    assert window.offsets.in_flight == 4  # 1, 3, 4, 5 stay unfinished
    assert harness.changes == 0, "a closed window still signalled the consumer"

    window.offer(records([b"f"], first=7))  # a fetch that raced the revocation
    assert window.waiting == 0
    assert window.in_flight == 0
    assert harness.started() == [0, 1, 2, 4]


async def test_close_with_nothing_in_flight_returns_at_once(harness: Harness) -> None:
    window = harness.make(limit=2)
    window.offer(records([b"a"]))
    await harness.until(lambda: harness.running == {0}, "running")
    harness.finish(0)
    await harness.finished(0)
    assert await asyncio.wait_for(window.close(60), WAIT_S) == 0
    assert window.offsets.to_commit() == 1


def test_a_window_needs_room() -> None:
    with pytest.raises(ValueError, match="at least one record"):
        PartitionWindow(0, Harness().work)
