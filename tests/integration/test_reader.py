"""Reading a topic to its end on the embedded broker, whose end offsets point at the start of
a partition's last batch, not past its last record."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from agentfabric.settings import Settings
from streams.reader import read_topic
from streams.topics import apply_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_read_topic_reads_every_record_of_a_multi_batch_partition(
        settings: Settings) -> None:
    topic = f"{settings.topic_prefix}.reader"
    await apply_topics(settings.bootstrap_servers, [topic], partitions=1, replication_factor=1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0)
    await producer.start()
    try:
        for _ in range(2):  # two batches of 150 records each
            sent = [await producer.send(topic, b"v%d" % i, partition=0) for i in range(150)]
            await asyncio.gather(*sent)
    finally:
        await producer.stop()
    offsets = [r.offset async for r in read_topic(settings, topic)]
    assert offsets == list(range(300))
