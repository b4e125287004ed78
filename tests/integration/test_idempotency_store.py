"""The emission store contract, on the in-memory fake and on the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from streams.embedded import StackInfo
from streams.idempotency import EmissionStore, MemoryEmissionStore, RedisEmissionStore
from streams.kafka import Outgoing

MESSAGES = [Outgoing("t.a", b"k", b"\x00\x01value", (("af-schema", b"x.v1"),)),
            Outgoing("t.b", None, b"", ())]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EmissionStore]:
    if request.param == "memory":
        yield MemoryEmissionStore()
        return
    from redis.asyncio import Redis

    info: StackInfo = request.getfixturevalue("stack")
    client = Redis.from_url(info.redis_url)
    try:
        yield RedisEmissionStore(client, f"test{uuid.uuid4().hex[:8]}", ttl_s=60)
    finally:
        await client.aclose()


async def test_unknown_key(store: EmissionStore) -> None:
    assert await store.recall("nope") == (None, False)


async def test_remember_then_acknowledge(store: EmissionStore) -> None:
    await store.remember("k1", MESSAGES)
    assert await store.recall("k1") == (MESSAGES, False)
    await store.acknowledge("k1")
    assert await store.recall("k1") == (None, True)


async def test_empty_output_is_remembered(store: EmissionStore) -> None:
    await store.remember("k2", [])
    assert await store.recall("k2") == ([], False)


@pytest.mark.integration
async def test_redis_entries_expire(stack: StackInfo) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(stack.redis_url)
    try:
        await RedisEmissionStore(client, "ttltest", ttl_s=60).remember("k", MESSAGES)
        assert 0 < await client.ttl("ttltest:emitted:k") <= 60
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_redis_down_is_transient() -> None:
    from redis.asyncio import Redis

    from agentfabric.errors import TransientError
    from streams.embedded import free_port

    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    try:
        with pytest.raises(TransientError, match="Redis is unavailable"):
            await RedisEmissionStore(client, "x", 60).recall("k")
    finally:
        await client.aclose()
