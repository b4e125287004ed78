"""Stored outputs are looked for on the real broker before they are sent again, so a worker
killed between a send and its mark leaves no second copy (streams.landed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from aiokafka import ConsumerRecord
from redis.asyncio import Redis

from agentfabric.settings import Settings
from streams import stages
from streams.embedded import StackInfo
from streams.executor import Job
from streams.idempotency import RedisEmissionStore
from streams.kafka import Outgoing, Producer
from streams.landed import LandedCheck
from streams.stages import Dedupe, Pass
from streams.topics import apply_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
async def topic(settings: Settings) -> str:
    name = f"{settings.topic_prefix}.landed.{uuid.uuid4().hex[:6]}"
    await apply_topics(settings.bootstrap_servers, [name], partitions=3, replication_factor=1)
    return name


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[Producer]:
    p = Producer(settings)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def landed(settings: Settings, producer: Producer) -> AsyncIterator[LandedCheck]:
    check = LandedCheck(settings, producer.partitions_for)
    try:
        yield check
    finally:
        await check.close()


def outputs(topic: str, n: int) -> list[Outgoing]:
    return [Outgoing(topic, f"run-{i}".encode(), f"result {i}".encode(),
                     (("af-schema", b"x.v1"),)) for i in range(n)]


async def test_only_the_outputs_not_on_the_broker_are_missing(
        topic: str, producer: Producer, landed: LandedCheck) -> None:
    since = int(time.time() * 1000)
    outs = outputs(topic, 12)
    await producer.send_all(outs[:8])  # spread over the 3 partitions by key
    changed = Outgoing(topic, outs[0].key, b"other bytes under the same key")
    missing = await landed.missing([*outs, changed], since)
    assert missing == [*outs[8:], changed]

    # the partitions read for the first question are remembered and read on from there
    await producer.send_all(outs[8:10])
    assert await landed.missing(outs, since) == outs[10:]
    assert await landed.missing([], since) == []


async def test_outputs_count_only_on_their_own_topic_and_partition_once_each(
        topic: str, producer: Producer, landed: LandedCheck, settings: Settings) -> None:
    other = f"{topic}.other"
    await apply_topics(settings.bootstrap_servers, [other], partitions=2, replication_factor=1)
    since = int(time.time() * 1000)
    [mine] = outputs(topic, 1)
    twin = Outgoing(other, mine.key, mine.value, mine.headers)  # same bytes, other topic
    await producer.send_all([twin])
    assert await landed.missing([mine], since) == [mine], "a twin on another topic"
    await producer.send_all([mine])
    # after reading one topic, another is still found (partitions from the producer)
    assert await landed.missing([twin, mine], since) == []
    # two stored copies of one output, one on the broker: one is missing
    assert await landed.missing([mine, mine], since) == [mine]
    # other headers are another record
    changed = Outgoing(topic, mine.key, mine.value, (("af-schema", b"x.v2"),))
    assert await landed.missing([changed], since) == [changed]


async def test_a_record_whose_stored_output_landed_sends_nothing_more(
        topic: str, producer: Producer, landed: LandedCheck, stack: StackInfo,
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "SETTLE_MS", 0)  # no sender alive to wait for
    redis = Redis.from_url(stack.redis_url)
    try:
        store = RedisEmissionStore(redis, f"{settings.topic_prefix}-{uuid.uuid4().hex[:6]}",
                                   ttl_s=60)
        dedupe = Dedupe(store, lease_ttl_s=5, landed=landed)
        sent, unsent = outputs(topic, 2)
        await store.remember("k-sent", [sent])  # stored, then sent, then the worker died
        await producer.send_all([sent])
        await store.remember("k-unsent", [unsent])  # stored, and the worker died
        for key, expected in (("k-sent", []), ("k-unsent", [unsent])):
            record = ConsumerRecord(topic="in", partition=0, offset=1, timestamp=0,
                                    timestamp_type=0, key=b"k", value=b"v", checksum=None,
                                    serialized_key_size=1, serialized_value_size=1,
                                    headers=())
            work = Pass(record, SimpleNamespace(name="test"))
            work.job = Job(message=SimpleNamespace(), dedupe_key=key,  # type: ignore[arg-type]
                           timeout_s=5)

            async def never(_: Pass) -> None:
                raise AssertionError("a stored output must not run the step again")

            await dedupe(work, never)
            assert work.outputs == expected
            assert work.ack_key == key
        await dedupe.leases.close()
    finally:
        await redis.aclose()
