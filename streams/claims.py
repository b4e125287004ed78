"""Claim checks: a message too large to send travels as a reference.

A message whose value is larger than ``claim_check_bytes`` is stored in Redis (under the
SHA-256 of its bytes, for ``idempotency_ttl_s``) and produced with an empty value and the
header ``af-claim-check: <digest>``; every agentfabric reader (the runtime's decode stage,
``results``, ``dlq``, the demo) puts the bytes back before decoding. So no message over
the broker's limit is ever produced, whatever a step's context grows to.
"""

from __future__ import annotations

import dataclasses
import hashlib

from aiokafka import ConsumerRecord
from redis.asyncio.client import Pipeline

from agentfabric.errors import DecodeError
from schemas.serde import header_value

from .batching import PipelinedRedis
from .kafka import Outgoing

__all__ = ["CLAIM_HEADER", "ClaimStore"]

CLAIM_HEADER = "af-claim-check"


class ClaimStore:
    def __init__(self, redis: PipelinedRedis, prefix: str, ttl_s: int, threshold: int) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:claim:"
        self._ttl_s = ttl_s
        self.threshold = threshold

    async def put(self, value: bytes) -> str:
        digest = hashlib.sha256(value).hexdigest()

        def build(pipe: Pipeline) -> None:
            pipe.set(self._prefix + digest, value, ex=self._ttl_s)
        await self._redis.execute(build)
        return digest

    async def check(self, messages: list[Outgoing]) -> list[Outgoing]:
        """The messages, each one over the threshold replaced by its claim check."""
        if all(len(m.value) <= self.threshold for m in messages):
            return messages
        out = []
        for m in messages:
            if len(m.value) <= self.threshold:
                out.append(m)
                continue
            digest = await self.put(m.value)
            out.append(Outgoing(m.topic, m.key, b"", (*m.headers,
                                                      (CLAIM_HEADER, digest.encode()))))
        return out

    async def resolve(self, record: ConsumerRecord) -> ConsumerRecord:
        """The record with its value put back if it travelled as a claim check."""
        ref = header_value(record.headers, CLAIM_HEADER)
        if ref is None:
            return record
        digest = ref.decode("ascii", "replace")
        [value] = await self._redis.execute(lambda pipe: pipe.get(self._prefix + digest))
        if value is None:
            raise DecodeError(f"the message's value was stored as claim check {digest[:16]}, "
                              f"which is no longer in Redis (kept for the idempotency TTL); "
                              f"it cannot be read")
        headers = tuple((k, v) for k, v in record.headers if k != CLAIM_HEADER)
        return dataclasses.replace(record, value=value, headers=headers)
