"""Redis you can restart, and Redis refusals that say what to fix, on a real embedded Redis.

Each test starts its own embedded stack on free ports (so restarting or filling its Redis
never disturbs the session stack) and stops it by pid at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError

from agentfabric.errors import UnavailableError
from agentfabric.settings import Settings
from agentfabric.worker import connect_redis
from streams.embedded import AOF_FILE, EmbeddedStack, StackInfo, free_port, pid_alive
from streams.idempotency import RedisEmissionStore
from streams.joins import RedisJoinStore
from streams.kafka import Outgoing

pytestmark = pytest.mark.integration

T = TypeVar("T")
DEADLINE_S = 20.0
MESSAGES = [Outgoing("t.a", b"k", b"\x00\x01value", (("af-schema", b"x.v1"),))]




@pytest.fixture
async def client(own_stack: tuple[EmbeddedStack, StackInfo]) -> AsyncIterator[Redis]:
    """A client as the worker makes one (redis-py's default retries)."""
    redis = Redis.from_url(own_stack[1].redis_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        yield redis
    finally:
        await redis.aclose()


async def eventually(call: Callable[[], Awaitable[T]], deadline_s: float = DEADLINE_S) -> T:
    """``call()`` once it stops raising connection errors (Redis coming back), bounded."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return await call()
        except (RedisError, UnavailableError):
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def settings_for(url: str) -> Settings:
    return Settings(redis_url=url)


async def test_keys_survive_a_restart_of_redis_alone(
        own_stack: tuple[EmbeddedStack, StackInfo], client: Redis) -> None:
    embedded, info = own_stack
    prefix = f"r{uuid.uuid4().hex[:8]}"
    emitted = RedisEmissionStore(client, prefix, ttl_s=600)
    joins = RedisJoinStore(client, prefix, ttl_s=600)
    await emitted.remember("run-1:step:0", MESSAGES)
    await emitted.remember("run-2:step:0", MESSAGES)
    await emitted.acknowledge("run-2:step:0")
    assert await joins.arrive("run-3:fan:0", "a", '{"a":1}', 2) is None  # waits for "b"

    stopped = embedded.stop_redis()
    assert stopped is not None
    assert stopped.pid == info.redis.pid
    assert not pid_alive(info.redis.pid, info.redis.binary)
    assert pid_alive(info.broker.pid, info.broker.binary)  # only Redis stopped
    assert (embedded.state_dir / AOF_FILE).stat().st_size > 0
    assert embedded.stop_redis() is None  # already stopped

    # while it is down, a store says so (a client without retries, so it answers at once)
    probe = Redis.from_url(info.redis_url, retry=Retry(NoBackoff(), 0),
                           socket_connect_timeout=2)
    try:
        with pytest.raises(UnavailableError, match="Redis is unavailable") as down:
            await RedisEmissionStore(probe, prefix, ttl_s=600).recall("run-1:step:0")
        assert "AGENTFABRIC_REDIS_URL" in down.value.reason
    finally:
        await probe.aclose()

    restarted = embedded.start_redis()
    assert restarted.port == info.redis.port
    assert restarted.pid != info.redis.pid
    recorded = embedded.running()
    assert recorded is not None
    assert recorded.redis.pid == restarted.pid
    assert recorded.broker == info.broker
    with pytest.raises(Exception, match="already running"):
        embedded.start_redis()

    # the same client reconnects by itself; everything written before is there
    assert await eventually(lambda: emitted.recall("run-1:step:0")) == (MESSAGES, False)
    assert await emitted.recall("run-2:step:0") == (None, True)
    assert 0 < await client.ttl(f"{prefix}:emitted:run-1:step:0") <= 600
    assert await joins.arrive("run-3:fan:0", "b", '{"b":2}', 2) == {
        "a": '{"a":1}', "b": '{"b":2}'}


async def test_a_client_reconnects_after_a_crash_of_redis(
        own_stack: tuple[EmbeddedStack, StackInfo], client: Redis) -> None:
    embedded = own_stack[0]
    assert await client.set("before", "1")
    stopped = embedded.stop_redis(kill=True)
    assert stopped is not None
    assert not pid_alive(stopped.pid, stopped.binary)
    embedded.start_redis()
    assert await eventually(lambda: client.set("after", "2"))
    assert await client.get("after") == b"2"
    assert await client.config_get("appendonly") == {"appendonly": "yes"}


async def test_a_new_stack_starts_with_an_empty_redis(tmp_path: Path) -> None:
    """The broker keeps its data in memory, so Redis state from an earlier stack (outputs
    marked acknowledged for messages that no longer exist) must not come back with `up`."""
    embedded = EmbeddedStack(tmp_path / "stack", broker_port=free_port(),
                             redis_port=free_port())
    info = embedded.start()
    try:
        redis = Redis.from_url(info.redis_url)
        try:
            await redis.set("stale", "1")
        finally:
            await redis.aclose()
        embedded.stop()
        assert (embedded.state_dir / AOF_FILE).exists()
        info = embedded.start()
        redis = Redis.from_url(info.redis_url)
        try:
            assert await redis.get("stale") is None
        finally:
            await redis.aclose()
    finally:
        embedded.stop()
    assert not pid_alive(info.redis.pid, info.redis.binary)


async def test_out_of_memory_is_unavailable_and_says_what_to_fix(client: Redis) -> None:
    prefix = f"m{uuid.uuid4().hex[:8]}"
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", "1mb")
    filler: list[str] = []
    # An output far larger than each filler write: whatever room the filling left, the
    # output's own command does not fit (Redis counts the command it is reading).
    output = [Outgoing("t.a", b"k", b"x" * 20_000, ())]
    try:
        with pytest.raises(OutOfMemoryError):  # noqa: PT012 - fill until Redis refuses
            for i in range(20_000):  # at most ~20 MB
                filler.append(f"{prefix}:fill:{i}")
                await client.set(filler[-1], b"x" * 1_000)
        with pytest.raises(UnavailableError) as refused:
            await RedisEmissionStore(client, prefix, ttl_s=60).remember("k", output)
        assert "OOM" in refused.value.reason
        assert "maxmemory" in refused.value.reason
        assert "noeviction" in refused.value.reason
        with pytest.raises(UnavailableError) as in_join:  # an error inside the Lua script
            await RedisJoinStore(client, prefix, ttl_s=60).arrive("k", "a", "x" * 50_000, 2)
        assert "OOM" in in_join.value.reason
        assert "parallel join" in in_join.value.reason
    finally:
        await client.config_set("maxmemory", "0")
        if filler:
            await client.delete(*filler)
    await RedisEmissionStore(client, prefix, ttl_s=60).remember("k", output)  # room again


async def test_a_read_only_replica_is_unavailable_and_says_what_to_fix(client: Redis) -> None:
    await client.replicaof("127.0.0.1", str(free_port()))
    try:
        with pytest.raises(UnavailableError) as refused:
            await RedisEmissionStore(client, "ro", ttl_s=60).remember("k", MESSAGES)
    finally:
        await client.replicaof("NO", "ONE")
    assert "READONLY" in refused.value.reason
    assert "primary" in refused.value.reason


async def test_a_key_of_the_wrong_type_names_the_prefix_setting(client: Redis) -> None:
    prefix = f"w{uuid.uuid4().hex[:8]}"
    await client.hset(f"{prefix}:emitted:k", "someone", "else")
    with pytest.raises(UnavailableError) as refused:
        await RedisEmissionStore(client, prefix, ttl_s=60).recall("k")
    assert "WRONGTYPE" in refused.value.reason
    assert "AGENTFABRIC_TOPIC_PREFIX" in refused.value.reason
    await client.set(f"{prefix}:join:j", "not a hash")
    with pytest.raises(UnavailableError) as in_join:
        await RedisJoinStore(client, prefix, ttl_s=60).arrive("j", "a", "1", 2)
    assert "WRONGTYPE" in in_join.value.reason


async def test_connect_refused_credentials_without_showing_them(
        own_stack: tuple[EmbeddedStack, StackInfo], client: Redis) -> None:
    info = own_stack[1]
    base = f"redis://{info.host}:{info.redis.port}/0"
    await client.config_set("requirepass", "s3cret-pw")
    try:
        with pytest.raises(UnavailableError) as no_auth:
            await connect_redis(settings_for(base))
        assert "NOAUTH" in no_auth.value.reason
        assert "AGENTFABRIC_REDIS_URL" in no_auth.value.reason
        with pytest.raises(UnavailableError) as wrong:
            await connect_redis(settings_for(
                f"redis://:wrong-pw@{info.host}:{info.redis.port}/0"))
        assert "WRONGPASS" in wrong.value.reason
        assert "wrong-pw" not in wrong.value.reason
        good = await connect_redis(settings_for(
            f"redis://:s3cret-pw@{info.host}:{info.redis.port}/0"))
        await good.aclose()
    finally:
        admin = Redis.from_url(f"redis://:s3cret-pw@{info.host}:{info.redis.port}/0")
        try:
            await admin.config_set("requirepass", "")
        finally:
            await admin.aclose()


async def test_connect_to_nothing_names_the_url_without_its_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(UnavailableError) as refused:
        await connect_redis(settings_for(url))
    reason = refused.value.reason
    assert "s3cret-pw" not in reason
    assert "127.0.0.1" in reason
    assert "AGENTFABRIC_REDIS_URL" in reason
    assert isinstance(refused.value.__cause__, RedisConnectionError | OSError)


async def test_connect_warns_about_an_evicting_policy(
        client: Redis, own_stack: tuple[EmbeddedStack, StackInfo],
        caplog: pytest.LogCaptureFixture) -> None:
    await client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with caplog.at_level(logging.WARNING, logger="agentfabric.worker"):
            redis = await connect_redis(settings_for(own_stack[1].redis_url))
            await redis.aclose()
    finally:
        await client.config_set("maxmemory-policy", "noeviction")
    assert any("allkeys-lru" in r.getMessage() and "noeviction" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agentfabric.worker"):
        redis = await connect_redis(settings_for(own_stack[1].redis_url))
        await redis.aclose()
    assert not caplog.records  # the embedded Redis is configured as production needs
