"""A consumer that stops leaves its group, so the next member of the group is assigned its
partitions at once, also on the embedded broker, whose first generation of a group is 0
(``streams.groupleave``). Without the leave, the next join waited for the stopped member's
session to expire: 18 s where a join takes 5 s."""

from __future__ import annotations

import time

import pytest
from aiokafka import AIOKafkaConsumer

from agentfabric.settings import Settings
from streams.kafka import make_consumer
from streams.topics import apply_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def _join(settings: Settings, group: str, topic: str) -> tuple[AIOKafkaConsumer, float]:
    consumer = make_consumer(settings, group, topic)
    started = time.monotonic()
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    return consumer, time.monotonic() - started


async def test_the_next_member_of_a_group_is_assigned_without_waiting_for_a_session(
        settings: Settings) -> None:
    topic, group = f"{settings.topic_prefix}.leave", f"{settings.topic_prefix}.leave-group"
    await apply_topics(settings.bootstrap_servers, [topic], partitions=3, replication_factor=1)
    first, first_join = await _join(settings, group, topic)
    generation = first._coordinator.generation  # type: ignore[attr-defined]
    await first.stop()
    second, second_join = await _join(settings, group, topic)
    try:
        assert len(second.assignment()) == 3
        # a member that did not leave holds the group for its session (6 s in the tests, so
        # the second join would take about 8 s longer than the first)
        assert second_join < first_join + 3, (generation, first_join, second_join)
    finally:
        await second.stop()
