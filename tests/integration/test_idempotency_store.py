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


async def test_claim_takes_a_lease_that_others_wait_on(store: EmissionStore) -> None:
    assert (await store.claim("c1", "d1", "me", 5_000)).state == "leased"
    assert (await store.claim("c1", "d1", "me", 5_000)).state == "leased", "re-entrant"
    other = await store.claim("c1", "d1", "you", 5_000)
    assert other.state == "busy"
    assert 0 < other.wait_ms <= 5_000


async def test_the_first_output_published_wins(store: EmissionStore) -> None:
    assert (await store.claim("c2", "d2", "me", 5_000)).state == "leased"
    assert await store.publish("c2", MESSAGES, "me", "d2") is None
    loser = await store.publish("c2", MESSAGES[:1], "you", "d2")
    assert loser is not None
    assert loser.state == "stored"
    assert loser.outputs == MESSAGES, "the loser re-sends the winner's bytes"
    found = await store.claim("c2", "d2", "they", 5_000)
    assert (found.state, found.outputs) == ("stored", MESSAGES)
    await store.acknowledge("c2")
    assert (await store.claim("c2", "d2", "they", 5_000)).state == "acked"


async def test_a_completed_unit_of_work_is_done_for_every_other_key(
        store: EmissionStore) -> None:
    await store.claim("c3:1", "d3", "me", 5_000)
    await store.publish("c3:1", MESSAGES, "me", "d3")
    assert (await store.claim("c3:replay:x:1", "d3", "me", 5_000)).state == "done"
    assert (await store.claim("c3:replay:x:1", "other", "me", 5_000)).state == "leased"


async def test_publishing_releases_the_lease_and_renewal_reports_lost_leases(
        store: EmissionStore) -> None:
    assert (await store.claim("c4", None, "me", 5_000)).state == "leased"
    assert await store.renew({"c4": "me"}, 5_000) == set()
    assert await store.renew({"c4": "you"}, 5_000) == {"c4"}
    await store.publish("c4", [], "me", None)
    assert await store.renew({"c4": "me"}, 5_000) == {"c4"}, "published: the lease is gone"
    assert (await store.claim("c5", None, "you", 5_000)).state == "leased"


async def test_settle_stores_once_and_then_returns_what_was_left(store: EmissionStore) -> None:
    assert await store.settle("s1", MESSAGES, "d-s1", True) is None
    assert await store.recall("s1") == (MESSAGES, False)
    again = await store.settle("s1", [], "d-s1", True)
    assert again is not None
    assert again.state == "stored"
    assert again.outputs == MESSAGES, "the first output stored must win"
    await store.acknowledge("s1")
    acked = await store.settle("s1", [], "d-s1", True)
    assert acked is not None
    assert acked.state == "acked"
    # the unit of work is done: another attempt's key (a replay) settles nothing
    done = await store.settle("s1:replay:x", MESSAGES, "d-s1", True)
    assert done is not None
    assert done.state == "done"
    assert await store.recall("s1:replay:x") == (None, False)


async def test_settle_of_a_failed_attempt_leaves_the_work_undone(store: EmissionStore) -> None:
    assert await store.settle("s2:1", MESSAGES, "d-s2", False) is None
    assert await store.settle("s2:2", MESSAGES, "d-s2", True) is None, "marked done too early"
    stale = await store.settle("s2:3", MESSAGES, "d-s2", True)
    assert stale is not None
    assert stale.state == "done"


async def test_forget_drops_the_output_and_the_done_mark(store: EmissionStore) -> None:
    assert await store.publish("f1", MESSAGES, "me", "d-f1") is None
    await store.forget("f1", "d-f1")
    assert await store.recall("f1") == (None, False)
    assert (await store.claim("f1:replay:x", "d-f1", "me", 5_000)).state == "leased"
