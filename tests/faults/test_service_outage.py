"""The HTTP service a step calls is down for 30 s; then `agentfabric dlq replay`.

Two workers run ``billing`` (``charge`` calls the side-effect service, ``judge`` asks the
model) with fast retry tiers (0.5 s, 1 s, 2 s; 4 attempts). While runs flow the service is
stopped for 30 s and started again on the same port. A refused connection is a transient
failure, so runs go through the retry tiers: those whose attempts outlast the outage
succeed, the others land on the dead-letter topic with a reason. Then
``agentfabric dlq replay --workflow billing`` completes every remaining run; replaying
again (by filter, then by naming the same ids) changes nothing: no new result, no new call
to the service, no new side effect, no new dead letter.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agentfabric.app import publish_events
from agentfabric.settings import Settings
from schemas.models import DeadLetter, RunResult
from streams.topics import TopicNames

from .harness import (
    WORKFLOW,
    ModelServer,
    SideEffectService,
    billing_workflow,
    invoices,
    judge_script,
    provision,
    run_ids,
    write_setup,
)
from .procs import Workers, cli
from .records import Follower, dead_letters_of, lag, one_result_each, read_all, snapshot

pytestmark = [pytest.mark.timeout(360)]

RUNS = 240
OUTAGE_S = 30.0
TIERS = [0.5, 1.0, 2.0]
ATTEMPTS = 4


async def test_service_down_for_30s_then_dlq_replay_completes_every_run(
        settings: Settings, service: SideEffectService, tmp_path: Path) -> None:
    model = ModelServer(judge_script(20))
    await model.start()
    wf_dir, models = write_setup(tmp_path, model.url, billing_workflow())
    s = settings.model_copy(update={
        "workflows_dir": wf_dir, "models_file": models, "partitions": 3, "lease_ttl_s": 5.0,
        "retry_tiers_s": TIERS, "max_attempts": ATTEMPTS})
    names = TopicNames(s.topic_prefix)
    await provision(s)
    events = invoices(RUNS)
    expected = run_ids(events)
    published: dict[str, float] = {}  # run id -> when its trigger was sent
    workers = Workers(s, tmp_path, service.url)
    marks: dict[str, float] = {}

    async def paced(started: float) -> None:
        for i in range(0, RUNS, 6):  # 6 runs a second for 40 s
            chunk = events[i:i + 6]
            await publish_events(s, names.trigger("erp"), chunk)
            for run in run_ids(chunk):
                published[run] = time.monotonic() - started
            await asyncio.sleep(1.0)

    def settled(results: list[RunResult], letters: list[DeadLetter]) -> int:
        return len({r.run_id for r in results} | {d.run_id for d in letters})

    try:
        async with Follower(s, names.results(WORKFLOW), RunResult) as results, \
                Follower(s, names.dlq, DeadLetter) as letters:
            pair = [workers.start(), workers.start()]
            await asyncio.gather(*(w.ready() for w in pair))
            started = time.monotonic()
            publisher = asyncio.create_task(paced(started))
            await results.until(lambda f: len(f) >= 20, within=60, check=workers.check)
            await service.stop()
            marks["down"] = time.monotonic() - started
            while time.monotonic() - started - marks["down"] < OUTAGE_S:  # the outage
                workers.check()
                await asyncio.sleep(0.5)
            await service.start()  # same port: the workers' URL still holds
            marks["up"] = time.monotonic() - started
            await publisher
            deadline = time.monotonic() + 60
            while settled(results.found, letters.found) < RUNS:
                workers.check()
                assert time.monotonic() < deadline, (
                    f"{settled(results.found, letters.found)} of {RUNS} runs settled")
                await asyncio.sleep(0.2)
            before = await one_result_each_or_dead(s, expected)
            calls_before = sum(service.calls.values())

            marks["replay"] = time.monotonic() - started
            replay = await asyncio.to_thread(cli, s, "dlq", "replay", "--workflow", WORKFLOW)
            marks["replayed"] = time.monotonic() - started
            await results.until(lambda f: len({r.run_id for r in f}) >= RUNS, within=90,
                                check=workers.check)
            marks["complete"] = time.monotonic() - started
            after_first = await one_result_each(s, expected)
            effects_first, calls_first = dict(service.effects), sum(service.calls.values())
            letters_first = len(await dead_letters_of(s))

            again = await asyncio.to_thread(cli, s, "dlq", "replay", "--workflow", WORKFLOW)
            ids = sorted(d.dead_letter_id for d in before.letters)
            named = await asyncio.to_thread(cli, s, "dlq", "replay", *ids)
            step_group = names.step_group(WORKFLOW, "charge")
            deadline = time.monotonic() + 60
            while (left := await lag(s, step_group, names.step(WORKFLOW, "charge"))) > 0:
                workers.check()
                assert time.monotonic() < deadline, f"{left} replayed records not consumed"
                await asyncio.sleep(0.5)
            after_again = await one_result_each(s, expected)
            letters_again = len(await dead_letters_of(s))
        codes = await workers.close()
    finally:
        await workers.close()
        await model.stop()

    retry_records = {f"{t:g}s": len(await snapshot(s, names.retry(WORKFLOW, "charge", t)))
                     for t in TIERS}
    during = [r for r, t in published.items() if marks["down"] <= t < marks["up"]]
    dead_runs = {d.run_id for d in before.letters}
    recovered = [r for r in during if r not in dead_runs]
    print(f"\n[service down {marks['up'] - marks['down']:.1f}s] {RUNS} runs, retry tiers "
          f"{TIERS}, {ATTEMPTS} attempts: {len(during)} runs published during the outage; "
          f"{len(before.results)} results and {len(before.letters)} dead letters before the "
          f"replay ({len(recovered)} runs published during the outage succeeded through the "
          f"retry tiers); retry-topic records per tier {retry_records}")
    print(f"  dlq replay --workflow: {replay.stdout.strip().splitlines()[-1]!r} (the command "
          f"took {marks['replayed'] - marks['replay']:.1f}s); every run complete "
          f"{marks['complete'] - marks['replay']:.1f}s after it started; results "
          f"{after_first.records} records for {len(after_first.results)} runs")
    print(f"  replay again: {again.stdout.strip().splitlines()[-1]!r}; by the {len(ids)} "
          f"ids: {named.stdout.strip().splitlines()[-1]!r}; then results "
          f"{after_again.records} records, service calls {sum(service.calls.values())} "
          f"(was {calls_first}), side effects {sum(service.effects.values())}, dead letters "
          f"{letters_again} (was {letters_first}); worker exit codes {codes}")

    assert before.letters, "the outage dead-lettered nothing: the test did not test replay"
    assert recovered, "no run got through the retry tiers after the outage"
    for letter in before.letters:
        assert letter.transient
        # the tool's own errors, or its breaker (the gateway opens it while the service is
        # down, so later attempts do not reach the service at all)
        assert letter.error_type in ("TransientError", "CircuitOpenError")
        assert (letter.workflow, letter.step) == (WORKFLOW, "charge")
        assert letter.attempts == ATTEMPTS
        assert "unreachable" in letter.reason or "circuit breaker" in letter.reason
        assert "replay the dead letter" in letter.reason
    assert calls_first == calls_before + len(before.letters), \
        "the replay called the service once per dead-lettered run"
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"replayed {len(before.letters)} dead letter" in replay.stdout, replay.stdout
    assert after_first.records == RUNS, after_first.copies[:5]
    assert sorted(service.effects) == sorted(expected.values())
    assert set(service.effects.values()) == {1}
    assert again.returncode == 0, again.stdout + again.stderr
    assert "replayed 0 dead letters" in again.stdout, again.stdout
    assert named.returncode == 0, named.stdout + named.stderr
    assert after_again.records == after_first.records
    assert dict(service.effects) == effects_first
    assert sum(service.calls.values()) == calls_first
    assert letters_again == letters_first
    assert all(code == 0 for code in codes.values()), codes


class Settled:
    """The runs' results and dead letters before the replay."""

    def __init__(self, results: dict[str, RunResult], letters: list[DeadLetter]) -> None:
        self.results, self.letters = results, letters


async def one_result_each_or_dead(s: Settings, expected: dict[str, str]) -> Settled:
    """Each run has one result or one dead letter (not both, not two)."""
    results = await read_all(s, TopicNames(s.topic_prefix).results(WORKFLOW), RunResult)
    letters = await dead_letters_of(s)
    ran = [r.run_id for r in results]
    dead = [d.run_id for d in letters]
    assert len(ran) == len(set(ran)), "a run has two results"
    assert len(dead) == len(set(dead)), "a run has two dead letters"
    assert not set(ran) & set(dead), "a run has a result and a dead letter"
    assert set(ran) | set(dead) == set(expected)
    return Settled({r.run_id: r for r in results}, letters)
