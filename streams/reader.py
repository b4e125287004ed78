"""Read a topic from the beginning without a consumer group: a snapshot up to the current
end offsets, or a follow that keeps going. Used by ``results`` and ``dlq``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from redis.asyncio import Redis

from agentfabric.errors import ConfigError, DecodeError, UnavailableError
from agentfabric.settings import Settings
from schemas.models import AvroModel
from schemas.serde import decode, header_value

from .kafka import make_consumer
from .redispool import open_redis

__all__ = ["read_topic", "read_until"]

M = TypeVar("M", bound=AvroModel)
log = logging.getLogger(__name__)


async def read_topic(settings: Settings, topic: str, *, follow: bool = False,
                     stop: asyncio.Event | None = None) -> AsyncIterator[ConsumerRecord]:
    """Yield every record of ``topic`` from the start; without ``follow``, stop at the end."""
    consumer = make_consumer(settings, None)
    claims = _LazyClaims(settings)
    try:
        await consumer.start()
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer.topics()  # refresh metadata once
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigError(f"topic {topic} does not exist; run `agentfabric topics apply`")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # Some brokers (the embedded one) report the start of the last batch + 1 as the end
        # offset; the high watermark of the first fetch response is the real end then.
        end = await consumer.end_offsets(tps)
        checked: set[TopicPartition] = set()
        remaining = {tp for tp in tps if end[tp] > 0}
        while follow or remaining:
            if stop is not None and stop.is_set():
                return
            batch = await consumer.getmany(timeout_ms=200)
            for tp, records in batch.items():
                if tp not in checked:
                    checked.add(tp)
                    end[tp] = max(end[tp], consumer.highwater(tp) or 0)
                for record in records:
                    yield await claims.resolve(record)
                    if not follow and record.offset + 1 >= end[tp]:
                        remaining.discard(tp)
    except KafkaError as exc:
        raise UnavailableError(f"cannot read {topic} from {settings.bootstrap_servers} "
                             f"({type(exc).__name__}); is the broker up?") from exc
    finally:
        await consumer.stop()
        await claims.close()


class _LazyClaims:
    """Puts back values that travelled as claim checks; connects to Redis only if one does."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Redis | None = None
        self.store: Any = None

    async def resolve(self, record: ConsumerRecord) -> ConsumerRecord:
        if header_value(record.headers, "af-claim-check") is None:
            return record
        if self.store is None:
            # imported here: streams.claims needs streams.batching, which needs streams.dlq,
            # which reads topics with this module
            from .batching import PipelinedRedis
            from .claims import ClaimStore

            self.redis = open_redis(self.settings)
            self.store = ClaimStore(PipelinedRedis(self.redis), self.settings.topic_prefix,
                                    self.settings.idempotency_ttl_s,
                                    self.settings.claim_check_bytes)
        try:
            return await self.store.resolve(record)
        except DecodeError as exc:
            log.warning("%s[%d]@%d: %s", record.topic, record.partition, record.offset,
                        exc.reason)
            return record

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


async def read_until(settings: Settings, topic: str, model: type[M],
                     enough: Callable[[list[M]], bool], *,
                     each: Callable[[M], None] | None = None,
                     within: float | None = None) -> list[M]:
    """Follow ``topic`` from the start, decoding each message as ``model`` (and handing it
    to ``each``), until ``enough(found)`` holds; with ``within``, stop after that many
    seconds and return what was found so far."""
    found: list[M] = []
    stop = asyncio.Event()

    async def follow() -> None:
        async for record in read_topic(settings, topic, follow=True, stop=stop):
            item = decode(record.value, record.headers, model)
            found.append(item)
            if each is not None:
                each(item)
            if enough(found):
                stop.set()

    if within is None:
        await follow()
    else:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(follow(), within)
    return found
