"""How every process of the fabric opens Redis: one client on a pool that waits for a free
connection instead of failing, with commands packed by hiredis (``streams.respack``).

redis-py's asyncio ``ConnectionPool`` raises ``MaxConnectionsError`` as soon as
``max_connections`` (100 by default in redis-py 8; 2**31 before) are checked out. A worker has many
records in flight at once, and the commands that are not pipelined (rate-limit slots,
breaker checks, joins) each take a connection, so a burst turned into "Redis is
unavailable" errors and retried records although Redis was fine. A
``BlockingConnectionPool`` queues those commands until a connection is free; only a
command that waits longer than ``redis_pool_wait_s`` fails, as a ``ConnectionError`` that
the fabric treats like Redis being down.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

from agentfabric.settings import Settings

from .respack import fast_packing

__all__ = ["open_redis"]


def open_redis(settings: Settings, *, socket_timeout: float | None = 10,
               connect_timeout: float | None = 5) -> Redis:
    """A client of ``settings.redis_url`` that owns its pool (``aclose`` closes both).

    At most ``settings.redis_max_connections`` connections are open at once; a command
    waits up to ``settings.redis_pool_wait_s`` for one. Options in the URL's query string
    (``?max_connections=...``, ``?timeout=...`` for the wait) win over the settings, as in
    redis-py.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_wait_s, socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout)
    return fast_packing(Redis.from_pool(pool))
