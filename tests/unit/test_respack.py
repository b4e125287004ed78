"""Commands packed by hiredis are byte for byte what redis-py's packer writes."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from streams.respack import _packing, fast_packing

ARGS = [
    ("EVALSHA", "ab" * 20, 3, "af:emit:k", "af:done:k", "af:x", b"\x00\xffv" * 3000, 1.5, -7),
    ("SET", "k", "é", "PX", 100),
    ("SET", "k", 0.1 + 0.2),
    ("SET", "k", 2**70),
    ("SET", "k", memoryview(b"ab")),
    ("SET", "k", bytearray(b"xy")),
    ("CONFIG GET", "maxmemory-policy"),
    (b"CONFIG GET", "save"),
    ("PING",),
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: str(a[0]))
def test_hiredis_packing_writes_what_redis_py_writes(args: tuple[Any, ...]) -> None:
    plain, fast = Connection(), _packing(Connection)()
    assert b"".join(bytes(c) for c in fast.pack_command(*args)) == \
        b"".join(bytes(c) for c in plain.pack_command(*args))
    assert b"".join(bytes(c) for c in fast.pack_commands([args, args])) == \
        b"".join(bytes(c) for c in plain.pack_commands([args, args]))


@pytest.mark.parametrize("bad", [True, object(), None])
def test_what_redis_py_refuses_is_refused_the_same_way(bad: Any) -> None:
    with pytest.raises(DataError) as plain:
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError) as fast:
        _packing(Connection)().pack_command("SET", "k", bad)
    assert str(fast.value) == str(plain.value)


@pytest.mark.parametrize(("url", "base"), [
    ("redis://localhost:6379/0", Connection),
    ("rediss://localhost:6379/0", SSLConnection),
    ("unix:///tmp/redis.sock", UnixDomainSocketConnection),
])
def test_every_kind_of_connection_keeps_its_class_and_packs_with_hiredis(
        url: str, base: type[Connection]) -> None:
    client = fast_packing(Redis.from_url(url))
    cls = client.connection_pool.connection_class
    assert issubclass(cls, base)
    assert cls is not base
    assert fast_packing(client).connection_pool.connection_class is cls  # not wrapped twice
