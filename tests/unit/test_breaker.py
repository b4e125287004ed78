"""The circuit breaker's logic on the in-memory breakers and a fake clock: failures within
the window open it, it stays open for ``open_s``, half-open admits a bounded number of
probes whose slots expire, probe successes close it and a probe failure opens it again;
stale outcomes are ignored; Redis errors are translated."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from agentfabric.errors import CircuitOpenError, UnavailableError
from streams.embedded import free_port
from tools.gateway.breaker import Admission, Breakers, MemoryBreakers, RedisBreakers
from tools.gateway.spec import BreakerPolicy

POLICY = BreakerPolicy(failures=3, window_s=30, open_s=10, half_open_probes=2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breakers(clock: FakeClock) -> MemoryBreakers:
    return MemoryBreakers(clock=clock)


async def fail(breakers: MemoryBreakers, times: int, tool: str = "crm",
               policy: BreakerPolicy = POLICY) -> None:
    for _ in range(times):
        await breakers.record(await breakers.admit(tool, policy), policy, ok=False)


async def open_then_half_open(breakers: MemoryBreakers, clock: FakeClock,
                              policy: BreakerPolicy = POLICY) -> None:
    await fail(breakers, policy.failures, policy=policy)
    clock.now += policy.open_s
    assert await breakers.state("crm", policy) == "half_open"


def test_memory_breakers_fit_the_protocol(breakers: MemoryBreakers) -> None:
    typed: Breakers = breakers
    assert typed is breakers


async def test_closed_admits_plain_calls(breakers: MemoryBreakers) -> None:
    admission = await breakers.admit("crm", POLICY)
    assert admission.tool == "crm"
    assert not admission.probe
    assert await breakers.state("crm", POLICY) == "closed"


async def test_failures_within_the_window_open_it(breakers: MemoryBreakers,
                                                  clock: FakeClock) -> None:
    await fail(breakers, 2)
    assert await breakers.state("crm", POLICY) == "closed"
    await fail(breakers, 1)
    assert await breakers.state("crm", POLICY) == "open"
    clock.now += 4
    with pytest.raises(CircuitOpenError) as caught:
        await breakers.admit("crm", POLICY)
    reason = caught.value.reason
    assert "'crm' is open (3 transient failure(s) within 30 s)" in reason
    assert "in 6.0 s" in reason


async def test_failures_older_than_the_window_do_not_count(breakers: MemoryBreakers,
                                                           clock: FakeClock) -> None:
    await fail(breakers, 2)
    clock.now += 31
    await fail(breakers, 2)
    assert await breakers.state("crm", POLICY) == "closed"
    await fail(breakers, 1)
    assert await breakers.state("crm", POLICY) == "open"


async def test_successes_do_not_reset_failures_within_the_window(
        breakers: MemoryBreakers) -> None:
    await fail(breakers, 2)
    for _ in range(5):
        await breakers.record(await breakers.admit("crm", POLICY), POLICY, ok=True)
    await fail(breakers, 1)
    assert await breakers.state("crm", POLICY) == "open"


async def test_breakers_are_per_tool(breakers: MemoryBreakers) -> None:
    await fail(breakers, 3, tool="crm")
    erp = await breakers.admit("erp", POLICY)
    assert not erp.probe
    await breakers.record(erp, POLICY, ok=True)
    assert await breakers.states() == {"crm": "open", "erp": "closed"}


async def test_half_open_admits_at_most_the_configured_probes(
        breakers: MemoryBreakers, clock: FakeClock) -> None:
    await open_then_half_open(breakers, clock)
    first, second = await breakers.admit("crm", POLICY), await breakers.admit("crm", POLICY)
    assert first.probe
    assert second.probe
    for _ in range(5):
        with pytest.raises(CircuitOpenError, match="half-open and its 2 probe call"):
            await breakers.admit("crm", POLICY)
    # a finished probe frees its slot for the next one
    await breakers.record(first, POLICY, ok=True)
    assert (await breakers.admit("crm", POLICY)).probe


async def test_probe_successes_in_a_row_close_it(breakers: MemoryBreakers,
                                                 clock: FakeClock) -> None:
    await open_then_half_open(breakers, clock)
    first, second = await breakers.admit("crm", POLICY), await breakers.admit("crm", POLICY)
    await breakers.record(first, POLICY, ok=True)
    assert await breakers.state("crm", POLICY) == "half_open"
    await breakers.record(second, POLICY, ok=True)
    assert await breakers.state("crm", POLICY) == "closed"
    assert not (await breakers.admit("crm", POLICY)).probe
    # closing forgot the failures that opened it: it takes `failures` new ones
    await fail(breakers, 2)
    assert await breakers.state("crm", POLICY) == "closed"


async def test_a_probe_failure_opens_it_for_another_open_period(
        breakers: MemoryBreakers, clock: FakeClock) -> None:
    await open_then_half_open(breakers, clock)
    good, bad = await breakers.admit("crm", POLICY), await breakers.admit("crm", POLICY)
    await breakers.record(good, POLICY, ok=True)
    await breakers.record(bad, POLICY, ok=False)
    assert await breakers.state("crm", POLICY) == "open"
    with pytest.raises(CircuitOpenError, match="a half-open probe call failed"):
        await breakers.admit("crm", POLICY)
    clock.now += POLICY.open_s - 0.1
    assert await breakers.state("crm", POLICY) == "open"
    clock.now += 0.1
    assert await breakers.state("crm", POLICY) == "half_open"
    # the success before the failure does not count towards closing: two more are needed
    again = await breakers.admit("crm", POLICY)
    await breakers.record(again, POLICY, ok=True)
    assert await breakers.state("crm", POLICY) == "half_open"


async def test_a_probe_that_never_reports_frees_its_slot_after_the_probe_ttl(
        clock: FakeClock) -> None:
    policy = BreakerPolicy(failures=1, window_s=30, open_s=10, half_open_probes=1)
    breakers = MemoryBreakers(clock=clock, probe_ttl_s=3)
    await open_then_half_open(breakers, clock, policy)
    lost = await breakers.admit("crm", policy)  # its process dies: no record ever
    assert lost.probe
    clock.now += 2.9
    with pytest.raises(CircuitOpenError, match=r"frees within 0\.1 s"):
        await breakers.admit("crm", policy)
    clock.now += 0.1
    probe = await breakers.admit("crm", policy)
    await breakers.record(probe, policy, ok=True)
    assert await breakers.state("crm", policy) == "closed"


async def test_probe_slots_expire_after_open_s_by_default(breakers: MemoryBreakers,
                                                          clock: FakeClock) -> None:
    policy = BreakerPolicy(failures=1, window_s=30, open_s=4, half_open_probes=1)
    await open_then_half_open(breakers, clock, policy)
    await breakers.admit("crm", policy)
    clock.now += 3.9
    with pytest.raises(CircuitOpenError):
        await breakers.admit("crm", policy)
    clock.now += 0.1
    assert (await breakers.admit("crm", policy)).probe


async def test_outcomes_from_an_older_generation_are_ignored(
        breakers: MemoryBreakers, clock: FakeClock) -> None:
    slow = await breakers.admit("crm", POLICY)  # admitted while closed, finishes late
    await fail(breakers, 3)
    await breakers.record(slow, POLICY, ok=False)  # does not extend the open period
    clock.now += POLICY.open_s
    probe = await breakers.admit("crm", POLICY)
    await breakers.record(slow, POLICY, ok=False)  # nor fail the half-open breaker
    assert await breakers.state("crm", POLICY) == "half_open"
    await breakers.record(probe, POLICY, ok=False)
    clock.now += POLICY.open_s
    await breakers.record(probe, POLICY, ok=True)  # a probe of the previous half-open
    assert await breakers.state("crm", POLICY) == "half_open"


async def test_states_lists_every_tool_with_state(breakers: MemoryBreakers,
                                                  clock: FakeClock) -> None:
    assert await breakers.states() == {}
    await fail(breakers, 3, tool="crm")
    await fail(breakers, 1, tool="erp")
    assert await breakers.states() == {"crm": "open", "erp": "closed"}
    clock.now += POLICY.open_s
    assert await breakers.states() == {"crm": "half_open", "erp": "closed"}


async def test_redis_errors_are_unavailable_with_a_reason() -> None:
    client = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=2)
    breakers = RedisBreakers(client)
    admission = Admission("crm", False, "t", 0)
    try:
        for call in (breakers.admit("crm", POLICY), breakers.record(admission, POLICY, False),
                     breakers.state("crm", POLICY), breakers.states()):
            with pytest.raises(UnavailableError) as caught:
                await call
            assert "circuit breaker" in caught.value.reason
    finally:
        await client.aclose()
