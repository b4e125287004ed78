"""The parallel join contract, on the in-memory fake and on the real Redis (Lua script)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from agents.joins import JoinStore, MemoryJoinStore
from streams.embedded import StackInfo
from streams.joins import RedisJoinStore


@pytest.fixture(params=["memory", "redis"])
async def joins(request: pytest.FixtureRequest) -> AsyncIterator[JoinStore]:
    if request.param == "memory":
        yield MemoryJoinStore()
        return
    from redis.asyncio import Redis

    info: StackInfo = request.getfixturevalue("stack")
    client = Redis.from_url(info.redis_url)
    try:
        yield RedisJoinStore(client, f"j{uuid.uuid4().hex[:8]}", ttl_s=60)
    finally:
        await client.aclose()


async def test_the_completing_branch_gets_every_payload(joins: JoinStore) -> None:
    assert await joins.arrive("run:fan:0", "a", '{"a":1}', 3) is None
    assert await joins.arrive("run:fan:0", "b", '{"b":2}', 3) is None
    assert await joins.arrive("run:fan:0", "c", '{"c":3}', 3) == {
        "a": '{"a":1}', "b": '{"b":2}', "c": '{"c":3}'}


async def test_redelivered_branches_count_once_and_only_the_emitter_emits(
        joins: JoinStore) -> None:
    assert await joins.arrive("k", "a", "1", 2) is None
    assert await joins.arrive("k", "a", "1", 2) is None
    assert await joins.arrive("k", "b", "2", 2) == {"a": "1", "b": "2"}
    assert await joins.arrive("k", "a", "1", 2) is None  # not the emitter
    assert await joins.arrive("k", "b", "2", 2) == {"a": "1", "b": "2"}  # re-emits


async def test_concurrent_arrivals_elect_exactly_one_emitter(joins: JoinStore) -> None:
    branches = [f"b{i}" for i in range(20)]
    outcomes = await asyncio.gather(*(joins.arrive("race", b, b, len(branches))
                                      for b in branches))
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    assert set(winners[0]) == set(branches)


async def test_fan_outs_are_separate(joins: JoinStore) -> None:
    assert await joins.arrive("run:fan:0", "a", "x", 2) is None
    assert await joins.arrive("run:fan:5", "b", "y", 2) is None
