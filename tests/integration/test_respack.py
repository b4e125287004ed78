"""A client whose commands hiredis packs (streams.respack) against the real embedded Redis."""

from __future__ import annotations

from redis.asyncio import Redis

from streams.embedded import StackInfo
from streams.respack import fast_packing


async def test_a_client_that_packs_with_hiredis_talks_to_a_real_redis(stack: StackInfo) -> None:
    client = fast_packing(Redis.from_url(stack.redis_url))
    try:
        value = b"\x00\xff" * 5000
        await client.set("respack:k", value, px=60_000)
        assert await client.get("respack:k") == value
        async with client.pipeline(transaction=False) as pipe:
            pipe.incrbyfloat("respack:f", 0.5)
            pipe.eval("return ARGV[1]", 0, "é")
            pipe.delete("respack:f")
            assert await pipe.execute() == [0.5, "é".encode(), 1]
        assert (await client.config_get("maxmemory-policy"))
    finally:
        await client.delete("respack:k")
        await client.aclose()
