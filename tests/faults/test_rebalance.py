"""A third worker joins and then leaves while 300 runs with a 300 ms model step flow.

Two workers run the ``billing`` workflow (the HTTP side effect, then an ``llm`` step whose
model answers after 300 ms). While the runs flow a third worker starts, takes partitions
(a rebalance of every group), and is then stopped with SIGTERM (another rebalance).
Expected: no run forks (exactly one result record per run: nobody crashed, so not even a
re-sent copy), every side effect applied once, at most 10 % more model calls than runs,
and every worker exits 0.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from agentfabric.settings import Settings
from schemas.models import RunResult
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
from .procs import Workers
from .records import Follower, one_result_each, publish_paced

pytestmark = [pytest.mark.timeout(300)]

RUNS = 300
MODEL_LATENCY_MS = 300


def done(found: list[RunResult]) -> int:
    return len({r.run_id for r in found})


async def test_a_third_worker_joins_and_leaves_while_300_runs_flow(
        settings: Settings, service: SideEffectService, tmp_path: Path) -> None:
    model = ModelServer(judge_script(MODEL_LATENCY_MS))
    await model.start()
    wf_dir, models = write_setup(tmp_path, model.url, billing_workflow())
    s = settings.model_copy(update={
        "workflows_dir": wf_dir, "models_file": models, "partitions": 6, "lease_ttl_s": 5.0,
        "retry_tiers_s": [0.5, 1.0, 2.0]})
    await provision(s)
    events = invoices(RUNS)
    expected = run_ids(events)
    workers = Workers(s, tmp_path, service.url)
    marks: dict[str, float] = {}
    try:
        async with Follower(s, TopicNames(s.topic_prefix).results(WORKFLOW),
                            RunResult) as follower:
            pair = [workers.start(), workers.start()]
            await asyncio.gather(*(w.ready() for w in pair))
            started = time.monotonic()
            # 300 runs over ~30 s: the flow outlasts both rebalances
            publisher = asyncio.create_task(publish_paced(s, events, batch=10, every_s=1.0))
            await follower.until(lambda f: done(f) >= 0.15 * RUNS, within=120,
                                 check=workers.check)
            marks["join"] = time.monotonic() - started
            third = workers.start()
            await third.ready(within=90)
            marks["joined"] = time.monotonic() - started
            await follower.until(lambda f: done(f) >= 0.6 * RUNS, within=120,
                                 check=workers.check)
            marks["leave"] = time.monotonic() - started
            third_code = await third.stop()
            marks["left"] = time.monotonic() - started
            results_when_left = done(follower.found)
            await publisher
            await follower.until(lambda f: done(f) >= RUNS, within=180, check=workers.check)
            wall_s = time.monotonic() - started
        codes = await workers.close()
        log = [e for e in await model.request_log() if e.get("workflow") == WORKFLOW]
    finally:
        await workers.close()
        await model.stop()
    outcome = await one_result_each(s, expected)
    calls_by_run = Counter(c.run for c in model.calls)
    figures = service.figures()
    resent = sum(w.text().count("published the output of") for w in workers.all)
    abandoned = sum(w.text().count("were abandoned") for w in workers.all)
    print(f"\n[join/leave] {RUNS} runs, model latency {MODEL_LATENCY_MS} ms, 6 partitions: "
          f"third worker started at {marks['join']:.1f}s, ready at {marks['joined']:.1f}s, "
          f"SIGTERM at {marks['leave']:.1f}s, gone at {marks['left']:.1f}s (exit "
          f"{third_code}, processed {third.processed()}, {results_when_left} results by "
          f"then); all results after {wall_s:.1f}s")
    print(f"  results: {len(outcome.results)} runs, {outcome.records} result records; model "
          f"calls {len(log)} for {RUNS} runs (ratio {len(log) / RUNS:.3f}, limit 1.10), runs "
          f"asked twice {sum(1 for n in calls_by_run.values() if n > 1)}")
    print(f"  service: {figures['calls']} calls for {figures['keys']} keys, side effects "
          f"{figures['effects']}; 'another worker published first' {resent}, records "
          f"abandoned at revocation {abandoned}; exit codes {codes | {third.name: third_code}}")

    assert outcome.records == RUNS, f"a run forked: {outcome.copies[:5]}"
    assert set(service.effects.values()) == {1}
    assert len(service.effects) == RUNS
    assert third.processed() > 0, "the third worker took no work: no rebalance was tested"
    assert len(log) <= 1.1 * RUNS, len(log)
    assert third_code == 0
    assert all(code == 0 for code in codes.values()), codes
