"""Records no well-behaved client writes: a header key that is not UTF-8, sent as a
hand-built batch (the CRC recomputed) through aiokafka's batch interface."""

from __future__ import annotations

import struct

from aiokafka import AIOKafkaProducer
from aiokafka.record.util import calc_crc32c

PLACEHOLDER = "AFBADKEY"


async def send_bad_header_key(producer: AIOKafkaProducer, topic: str, key: bytes,
                              value: bytes, bad_key: bytes = b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8",
                              partition: int = 0) -> None:
    """Produce one record whose header key is ``bad_key`` (8 bytes, not UTF-8)."""
    assert len(bad_key) == len(PLACEHOLDER)
    batch = producer.create_batch()
    batch.append(timestamp=None, key=key, value=value, headers=[(PLACEHOLDER, b"x")])
    raw = bytearray(batch._build())
    at = raw.find(PLACEHOLDER.encode())
    raw[at:at + len(bad_key)] = bad_key
    # v2 batch: base offset (8), length (4), leader epoch (4), magic (1), crc (4), then the
    # CRC-32C of everything from the attributes on
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))
    batch._buffer = bytes(raw)
    await (await producer.send_batch(batch, topic, partition=partition))
