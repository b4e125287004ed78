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
    (" PING",),
    (b" PING",),
    ("PING ",),
    ("CONFIG\tGET", "save"),
    ("",),
    (b"",),
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


def test_the_fast_path_packs_with_hiredis_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    import streams.respack as respack

    calls: list[tuple[Any, ...]] = []
    original = respack._hiredis_pack

    def counting(args: tuple[Any, ...]) -> bytes:
        calls.append(args)
        return original(args)

    monkeypatch.setattr(respack, "_hiredis_pack", counting)
    pieces = _packing(Connection)().pack_command(*ARGS[0])
    assert len(pieces) == 1  # redis-py splits a 9,000-byte value into several pieces
    assert calls == [ARGS[0]]
    # names redis-py splits or trims, and bools, go through redis-py, not hiredis
    _packing(Connection)().pack_command("CONFIG\tGET", "save")
    _packing(Connection)().pack_command(b" PING")
    with pytest.raises(DataError):
        _packing(Connection)().pack_command("SET", "k", True)
    assert len(calls) == 1


@pytest.mark.parametrize("kwargs", [
    {"encoding": "latin-1"},
    {"encoding": "utf-8", "encoding_errors": "replace"},
    {"encoding": "no-such-codec"},
])
def test_a_client_that_does_not_encode_strict_utf8_keeps_redis_py_packing(
        kwargs: dict[str, Any]) -> None:
    client = fast_packing(Redis.from_url("redis://localhost:6379/0", **kwargs))
    assert client.connection_pool.connection_class is Connection


def test_a_client_with_its_own_encoder_keeps_redis_py_packing() -> None:
    from redis._parsers import Encoder

    class Upper(Encoder):
        def encode(self, value: Any) -> Any:
            return super().encode(value.upper() if isinstance(value, str) else value)

    client = fast_packing(Redis.from_url("redis://localhost:6379/0", encoder_class=Upper))
    assert client.connection_pool.connection_class is Connection


def test_utf8_under_another_spelling_still_packs_with_hiredis() -> None:
    client = fast_packing(Redis.from_url("redis://localhost:6379/0", encoding="UTF8"))
    assert client.connection_pool.connection_class is not Connection


def test_a_client_that_decodes_responses_still_packs_with_hiredis() -> None:
    client = fast_packing(Redis.from_url("redis://localhost:6379/0", decode_responses=True))
    assert client.connection_pool.connection_class is not Connection
