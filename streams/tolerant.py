"""Records whose header keys are not UTF-8 must not stop a consumer.

aiokafka (0.14, C extension) decodes header keys strictly while it iterates a fetched
batch, so one foreign record with a non-UTF-8 header key raises out of ``getmany`` and the
batch can never be read past it. ``install`` wraps the fetcher's record reader: batches are
read by the fast C reader as before, and only a batch on which it fails is read again by
aiokafka's pure-Python reader with lenient header keys. A key that is not UTF-8 arrives
escaped and marked with ``INVALID_KEY_PREFIX``; the runtime's decode stage dead-letters
such a record with a reason (``invalid_header_keys``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiokafka.consumer import fetcher as _fetcher
from aiokafka.record import memory_records as _memory_records
from aiokafka.record.default_records import _DefaultRecordBatchPy

__all__ = ["INVALID_KEY_PREFIX", "install", "invalid_header_keys"]

INVALID_KEY_PREFIX = "af-invalid-utf8:"
lenient_reads = 0  # header keys this process read leniently (0: no record needs checking)
_CMemoryRecords = _memory_records.MemoryRecords


class _LenientText(bytearray):
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        try:
            return bytearray.decode(self, encoding, errors)
        except UnicodeDecodeError:
            global lenient_reads  # a process-wide fact, read on the hot path
            lenient_reads += 1
            return INVALID_KEY_PREFIX + bytearray.decode(self, encoding, "backslashreplace")


class _LenientBuffer(bytearray):
    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return _LenientText(item) if isinstance(index, slice) else item


class _LenientBatch(_DefaultRecordBatchPy):  # type: ignore[misc]
    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        this: Any = self  # aiokafka's private reader: its buffer is untyped
        if not isinstance(this._buffer, _LenientBuffer):
            this._buffer = _LenientBuffer(this._buffer)


class _Batch:
    """A C batch that falls back to the lenient reader for what it cannot read."""

    def __init__(self, batch: Any, data: Any, start: int, end: int) -> None:
        self._batch, self._data, self._start, self._end = batch, data, start, end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        read = 0
        try:
            for record in self._batch:
                read += 1
                yield record
            return
        except UnicodeDecodeError:
            pass
        for index, record in enumerate(_LenientBatch(bytes(self._data[self._start:self._end]))):
            if index >= read:
                yield record


class TolerantMemoryRecords:
    """aiokafka's MemoryRecords, batch by batch, with the lenient fallback."""

    def __init__(self, data: Any) -> None:
        self._records = _CMemoryRecords(data)
        self._data = data
        self._pos = 0

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        if batch is None:
            return None
        # every batch (and every v0/v1 message) is framed as offset (8) + length (4) + body
        start = self._pos
        length = int.from_bytes(bytes(self._data[start + 8:start + 12]), "big", signed=True)
        self._pos = start + 12 + length
        if getattr(batch, "magic", 2) != 2:
            return batch
        return _Batch(batch, self._data, start, self._pos)


def install() -> None:
    """Make every aiokafka consumer in this process read batches with the fallback."""
    setattr(_fetcher, "MemoryRecords", TolerantMemoryRecords)  # noqa: B010


def invalid_header_keys(headers: Any) -> list[str]:
    """The header keys of a record that were not UTF-8 (escaped), if any."""
    if not lenient_reads:
        return []
    return [k[len(INVALID_KEY_PREFIX):] for k, _ in headers or ()
            if isinstance(k, str) and k.startswith(INVALID_KEY_PREFIX)]
