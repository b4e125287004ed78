"""Offset bookkeeping commits only the contiguous finished prefix."""

from __future__ import annotations

import pytest

from streams.offsets import PartitionOffsets


def test_in_order() -> None:
    t = PartitionOffsets()
    assert t.to_commit() is None
    t.start(5)
    assert t.to_commit() is None
    t.finish(5)
    assert t.to_commit() == 6
    t.committed(6)
    assert t.to_commit() is None


def test_out_of_order_finish_waits_for_the_gap() -> None:
    t = PartitionOffsets()
    for offset in (10, 11, 12):
        t.start(offset)
    t.finish(12)
    t.finish(11)
    assert t.to_commit() is None
    assert t.in_flight == 1
    t.finish(10)
    assert t.to_commit() == 13
    assert t.in_flight == 0


def test_misuse_is_an_error() -> None:
    t = PartitionOffsets()
    t.start(3)
    with pytest.raises(ValueError, match="out of order"):
        t.start(2)
    with pytest.raises(KeyError, match="was not started"):
        t.finish(9)
