"""A worker process for tests/integration/test_gateway_shared_state.py: one gateway replica's
rate limiter and breakers on a shared Redis, driven by JSON commands, one per line, on
stdin; it answers each with one JSON line on stdout (and says ``{"ready": pid}`` first).

    python -m tests.integration._shared_state_worker REDIS_URL RL_PREFIX CB_PREFIX [PROBE_TTL_S]

Commands (``op``): ``hammer`` (take rate-limit slots from ``tasks`` concurrent callers for
``seconds``; answers the wall-clock moments granted), ``fail`` (``n`` admitted calls that
fail), ``admit`` (``n`` concurrent admits, held), ``finish`` (record the held admissions
with ``ok``), ``state``, ``wait_state`` (until the breaker is in ``state``), ``wait_admit``
(admit until admitted, held), ``exit``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from redis.asyncio import Redis

from agentfabric.errors import CircuitOpenError, RateLimitedError
from tools.gateway.breaker import Admission, RedisBreakers
from tools.gateway.ratelimit import RedisRateLimiter
from tools.gateway.spec import BreakerPolicy, RateLimitPolicy


async def hammer(limiter: RedisRateLimiter, cmd: dict[str, Any]) -> dict[str, Any]:
    policy = RateLimitPolicy(**cmd["policy"])
    grants: list[float] = []
    counts = {"calls": 0, "refused": 0}

    deadline = time.time() + cmd["seconds"]

    async def caller() -> None:
        # each caller stops by itself at the deadline: cancelling a caller inside a Redis
        # call is not needed (a slot taken after the deadline is not counted)
        while time.time() < deadline:
            counts["calls"] += 1
            try:
                await limiter.acquire(cmd["key"], policy)
            except RateLimitedError:
                counts["refused"] += 1
                await asyncio.sleep(0.05)  # a caller's back-off, as the gateway's retry
                continue
            if (now := time.time()) < deadline:
                grants.append(now)

    await asyncio.gather(*(caller() for _ in range(cmd["tasks"])))
    return {"grants": grants, **counts}


class Replica:
    def __init__(self, redis: Redis, rl_prefix: str, cb_prefix: str,
                 probe_ttl_s: float | None) -> None:
        self.limiter = RedisRateLimiter(redis, prefix=rl_prefix)
        self.breakers = RedisBreakers(redis, prefix=cb_prefix, probe_ttl_s=probe_ttl_s)
        self.held: list[Admission] = []

    async def admit(self, tool: str, policy: BreakerPolicy) -> str | None:
        try:
            self.held.append(await self.breakers.admit(tool, policy))
        except CircuitOpenError as exc:
            return exc.reason
        return None

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op, tool = cmd["op"], cmd.get("tool", "")
        if op == "hammer":
            return await hammer(self.limiter, cmd)
        policy = BreakerPolicy(**cmd.get("policy", {}))
        if op == "fail":
            for _ in range(cmd["n"]):
                admission = await self.breakers.admit(tool, policy)
                await self.breakers.record(admission, policy, ok=False)
        elif op == "admit":
            refused = await asyncio.gather(*(self.admit(tool, policy)
                                             for _ in range(cmd["n"])))
            return {"admitted": len(self.held), "probes": sum(a.probe for a in self.held),
                    "refused": [r for r in refused if r is not None]}
        elif op == "finish":
            for admission in self.held:
                await self.breakers.record(admission, policy, ok=cmd["ok"])
            self.held = []
        elif op == "wait_state":
            deadline = time.monotonic() + cmd["timeout"]
            while time.monotonic() < deadline:  # the breaker's state lives in Redis: poll
                if await self.breakers.state(tool, policy) == cmd["state"]:
                    break
                await asyncio.sleep(0.02)
        elif op == "wait_admit":
            started, refusals = time.monotonic(), 0
            while await self.admit(tool, policy) is not None:
                refusals += 1
                if time.monotonic() - started > cmd["timeout"]:
                    break
                await asyncio.sleep(0.02)
            return {"admitted": len(self.held), "refusals": refusals,
                    "after_s": time.monotonic() - started}
        return {"state": await self.breakers.state(tool, policy),
                "states": await self.breakers.states()}


async def main(argv: list[str]) -> None:
    url, rl_prefix, cb_prefix = argv[:3]
    probe_ttl_s = float(argv[3]) if len(argv) > 3 else None
    redis = Redis.from_url(url)
    replica = Replica(redis, rl_prefix, cb_prefix, probe_ttl_s)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                break
            try:
                answer = await replica.run(cmd)
            except Exception as exc:  # noqa: BLE001 - answered, so the test fails with it, not waits
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
