"""Rate limits and circuit breakers shared by gateway replicas, on the session's real Redis.

Two OS processes (tests/integration/_shared_state_worker.py, driven over stdin/stdout) stand
for two worker replicas: together they see at most the configured rate, failures recorded
by one open the breaker for the other, the half-open breaker admits at most its probes
across both, and a probe whose process is killed does not wedge it. Every process started
here is stopped by its pid at the end. The same semantics are checked on the in-memory and
the Redis implementations.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from agentfabric.errors import CircuitOpenError, RateLimitedError
from streams.embedded import StackInfo, pid_alive
from tools.gateway.breaker import Breakers, MemoryBreakers, RedisBreakers
from tools.gateway.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from tools.gateway.spec import BreakerPolicy, RateLimitPolicy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    """One worker process and its command line protocol."""

    def __init__(self, proc: subprocess.Popen[str], stderr: IO[str]) -> None:
        self.proc, self.stderr = proc, stderr
        self.pid = proc.pid
        assert self.reply() == {"ready": self.pid}

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise AssertionError(f"worker {self.pid} ended: {self.stderr.read()[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, f"worker {self.pid} failed: {answer['error']}"
        return answer

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.reply()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def spawn(stack: StackInfo, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start worker processes on the session Redis (prefixes of this test's own); at the
    end each is asked to exit, killed by its pid if it does not, and checked gone."""
    tag = uuid.uuid4().hex[:10]
    workers: list[Worker] = []

    def start(probe_ttl_s: float | None = None) -> Worker:
        args = [sys.executable, "-m", "tests.integration._shared_state_worker",
                stack.redis_url, f"t{tag}:rl", f"t{tag}:cb"]
        if probe_ttl_s is not None:
            args.append(str(probe_ttl_s))
        stderr = (tmp_path / f"worker{len(workers)}.err").open("w+")
        proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        try:
            worker = Worker(proc, stderr)
        except BaseException:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                try:
                    worker.send(op="exit")
                    worker.proc.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass  # killed by pid just below
            worker.kill()
            worker.stderr.close()
            for pipe in (worker.proc.stdin, worker.proc.stdout):
                if pipe is not None:
                    pipe.close()
            assert not pid_alive(worker.pid)


def evalsha_calls(url: str) -> int:
    """Script calls Redis answered (a first call's NOSCRIPT, answered by loading the
    script and calling again, is a failed call)."""
    with SyncRedis.from_url(url) as client:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


def test_two_processes_together_see_at_most_the_configured_rate(
        spawn: Callable[..., Worker], stack: StackInfo) -> None:
    a, b = spawn(), spawn()
    policy = {"limit": 20, "period_s": 1.0, "max_wait_s": 2.0}
    scripts_before = evalsha_calls(stack.redis_url)
    for worker in (a, b):
        worker.send(op="hammer", key="svc:acme", policy=policy, seconds=2.95, tasks=4)
    ra, rb = a.reply(), b.reply()
    grants = sorted(ra["grants"] + rb["grants"])

    busiest = max(bisect_left(grants, t + 1.0) - i for i, t in enumerate(grants))
    assert busiest <= 22, f"{busiest} calls within one second (limit 20/s, 10% allowed)"
    # a moving window of 20/s over ~3 s: 20 at once, then 20 more each second
    assert 54 <= len(grants) <= 66, len(grants)
    assert ra["grants"]
    assert rb["grants"], "both processes got slots"
    # no polling: one script call per slot (plus the callers cancelled while waiting)
    calls = ra["calls"] + rb["calls"]
    assert ra["refused"] + rb["refused"] == 0
    assert calls <= len(grants) + 8
    assert evalsha_calls(stack.redis_url) - scripts_before <= calls


def test_two_processes_share_the_breaker_and_its_bounded_probes(
        spawn: Callable[..., Worker]) -> None:
    a, b = spawn(), spawn()
    policy = {"failures": 3, "window_s": 30.0, "open_s": 1.0, "half_open_probes": 2}
    assert a.ask(op="fail", tool="svc", n=2, policy=policy)["state"] == "closed"
    assert a.ask(op="fail", tool="svc", n=1, policy=policy)["state"] == "open"

    # opened by A's failures, B's calls are refused: the service receives none
    seen = b.ask(op="admit", tool="svc", n=3, policy=policy)
    assert seen["admitted"] == 0
    assert len(seen["refused"]) == 3
    assert all("'svc' is open (3 transient failure(s)" in r for r in seen["refused"])
    assert b.ask(op="state", tool="svc", policy=policy)["states"] == {"svc": "open"}

    waited = b.ask(op="wait_state", tool="svc", state="half_open", timeout=10, policy=policy)
    assert waited["state"] == "half_open"
    for worker in (a, b):  # 10 concurrent admits across both processes
        worker.send(op="admit", tool="svc", n=5, policy=policy)
    ra, rb = a.reply(), b.reply()
    assert ra["admitted"] + rb["admitted"] == 2
    assert ra["probes"] + rb["probes"] == 2
    refused = ra["refused"] + rb["refused"]
    assert len(refused) == 8
    assert all("half-open and its 2 probe call(s)" in r for r in refused)

    for worker in (a, b):  # each reports its probes' successes: the second closes it
        worker.send(op="finish", ok=True, tool="svc", policy=policy)
    assert "closed" in {a.reply()["state"], b.reply()["state"]}
    assert a.ask(op="state", tool="svc", policy=policy)["states"] == {"svc": "closed"}
    after = b.ask(op="admit", tool="svc", n=3, policy=policy)
    assert after["admitted"] == 3
    assert after["probes"] == 0


def test_a_probe_whose_process_dies_does_not_wedge_the_breaker(
        spawn: Callable[..., Worker]) -> None:
    a, b = spawn(probe_ttl_s=1.0), spawn(probe_ttl_s=1.0)
    policy = {"failures": 1, "window_s": 30.0, "open_s": 0.5, "half_open_probes": 1}
    assert a.ask(op="fail", tool="svc", n=1, policy=policy)["state"] == "open"
    assert a.ask(op="wait_state", tool="svc", state="half_open", timeout=10,
                 policy=policy)["state"] == "half_open"
    probe = a.ask(op="admit", tool="svc", n=1, policy=policy)
    assert probe["probes"] == 1
    a.kill()  # dies holding the only probe slot
    assert not pid_alive(a.pid)

    refused = b.ask(op="admit", tool="svc", n=1, policy=policy)
    assert refused["admitted"] == 0
    assert "half-open" in refused["refused"][0]
    started = time.monotonic()
    got = b.ask(op="wait_admit", tool="svc", timeout=10, policy=policy)
    assert got["admitted"] == 1
    assert time.monotonic() - started < 2.0  # the dead probe's slot lived 1 s at most
    assert b.ask(op="finish", ok=True, tool="svc", policy=policy)["state"] == "closed"


# The same semantics on the in-memory twin and on Redis (real clocks, short periods).

async def until_state(breakers: Breakers, policy: BreakerPolicy, state: str) -> None:
    deadline = time.monotonic() + 5
    while await breakers.state("svc", policy) != state:
        assert time.monotonic() < deadline, f"never {state}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_breaker_semantics_match_on_memory_and_redis(kind: str, stack: StackInfo) -> None:
    client = Redis.from_url(stack.redis_url)
    breakers: Breakers = (MemoryBreakers() if kind == "memory"
                          else RedisBreakers(client, prefix=f"t{uuid.uuid4().hex[:10]}:cb"))
    policy = BreakerPolicy(failures=2, window_s=5, open_s=0.3, half_open_probes=1)
    try:
        assert await breakers.states() == {}
        await breakers.record(await breakers.admit("svc", policy), policy, ok=False)
        assert await breakers.state("svc", policy) == "closed"
        await breakers.record(await breakers.admit("svc", policy), policy, ok=False)
        assert await breakers.state("svc", policy) == "open"
        with pytest.raises(CircuitOpenError, match="is open"):
            await breakers.admit("svc", policy)
        await until_state(breakers, policy, "half_open")
        probe = await breakers.admit("svc", policy)
        assert probe.probe
        with pytest.raises(CircuitOpenError, match="half-open"):
            await breakers.admit("svc", policy)
        await breakers.record(probe, policy, ok=False)
        assert await breakers.states() == {"svc": "open"}
        await until_state(breakers, policy, "half_open")
        probe = await breakers.admit("svc", policy)
        await breakers.record(probe, policy, ok=True)
        assert await breakers.states() == {"svc": "closed"}
    finally:
        await client.aclose()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_rate_limit_semantics_match_on_memory_and_redis(kind: str,
                                                              stack: StackInfo) -> None:
    client = Redis.from_url(stack.redis_url)
    limiter: RateLimiter = (MemoryRateLimiter() if kind == "memory"
                            else RedisRateLimiter(client, prefix=f"t{uuid.uuid4().hex[:10]}"))
    policy = RateLimitPolicy(limit=3, period_s=0.3, max_wait_s=0.5)
    try:
        waits = [await limiter.acquire("k", policy) for _ in range(3)]
        assert waits[0] == 0.0
        assert all(0.05 < w <= 0.11 for w in waits[1:]), waits  # paced 0.1 s apart
        with pytest.raises(RateLimitedError, match="no free slot"):
            await limiter.acquire("k", RateLimitPolicy(limit=3, period_s=0.3, max_wait_s=0))
        started = time.monotonic()
        waited = await limiter.acquire("k", policy)
        assert 0.05 < waited <= 0.11
        assert time.monotonic() - started >= waited
        assert await limiter.acquire("other", policy) == 0.0
    finally:
        await client.aclose()
