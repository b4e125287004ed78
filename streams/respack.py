"""Commands packed into the Redis protocol by hiredis (C) instead of redis-py's Python packer.

redis-py's synchronous client packs with ``hiredis.pack_command`` when hiredis is installed;
its asyncio client (5.x to 8.x) always packs in Python, argument by argument. In a worker at
full rate that packing was 8% of the process's CPU (decision 0014). :func:`fast_packing`
gives a client's connection pool a subclass of its connection class whose ``pack_command``
calls hiredis, and falls back to redis-py's own for what hiredis does not take, so errors
(e.g. a ``bool`` argument) read as they did. hiredis always encodes text as strict UTF-8, so a
client set up with another encoding, other encoding errors or its own encoder class keeps
redis-py's packer.
"""

from __future__ import annotations

import codecs
from typing import Any

from hiredis import pack_command as _hiredis_pack  # a dependency (pyproject.toml)
from redis._parsers import Encoder as _DefaultEncoder
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

__all__ = ["fast_packing"]

_made: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """``base`` (plain, TLS or Unix socket) with hiredis packing, made once per class."""
    if base in _made:
        return _made[base]

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        first = args[0] if args else None
        # a name redis-py splits or trims ('CONFIG GET', ' PING', '') goes through redis-py;
        # bools are refused by redis-py (hiredis would send them as 0/1)
        if (isinstance(first, (str, bytes)) and first.split() != [first]) or \
                bool in map(type, args):
            return base.pack_command(self, *args)
        try:
            return [_hiredis_pack(args)]
        except TypeError:  # a type hiredis does not pack: redis-py says what is wrong
            return base.pack_command(self, *args)

    made = type(f"HiredisPacking{base.__name__}", (base,), {"pack_command": pack_command})
    _made[base] = made
    return made


def _encodes_like_hiredis(kwargs: dict[str, Any]) -> bool:
    """Whether connections made with ``kwargs`` encode text as hiredis does (strict UTF-8)."""
    try:
        utf8 = codecs.lookup(kwargs.get("encoding", "utf-8")).name == "utf-8"
    except LookupError:
        return False
    return utf8 and kwargs.get("encoding_errors", "strict") == "strict" \
        and kwargs.get("encoder_class", _DefaultEncoder) is _DefaultEncoder


def fast_packing(redis: Redis) -> Redis:
    """Make the connections ``redis`` opens from now on pack with hiredis; returns it.

    A client whose text encoding is not strict UTF-8 through redis-py's own encoder is
    returned unchanged.
    """
    pool = redis.connection_pool
    if issubclass(pool.connection_class, AbstractConnection) \
            and pool.connection_class not in _made.values() \
            and _encodes_like_hiredis(pool.connection_kwargs):
        pool.connection_class = _packing(pool.connection_class)
    return redis
