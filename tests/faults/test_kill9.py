"""kill -9 of a worker, three times, while 2,000 runs flow through two worker processes.

Each run calls a real HTTP service that applies a side effect once per idempotency key
(``charge``), then asks the local model server (``judge``, an ``llm`` step, 30 ms). One of
the two workers is killed with SIGKILL at 15 %, 45 % and 75 % of the results, and a
replacement started each time. Expected: exactly one result record per run (an output
the broker acknowledged before a kill but not yet marked in Redis is found on the broker by
its next owner and not sent again, streams.landed), every side effect applied exactly once
(a re-run sends the same key), and no
more model calls than runs plus the calls in flight at the three kills (completed calls
are answered from the journal when a step runs again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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
from .records import Follower, dump, one_result_each, publish_paced

pytestmark = [pytest.mark.timeout(420)]

RUNS = 2000
KILL_AT = (0.15, 0.45, 0.75)
MODEL_LATENCY_MS = 30
GRACE_S = 0.25  # an answer in transit or not yet journaled when the kill lands


async def test_kill9_three_times_while_2000_runs_flow(settings: Settings,
                                                     service: SideEffectService,
                                                     tmp_path: Path) -> None:
    model = ModelServer(judge_script(MODEL_LATENCY_MS))
    await model.start()
    wf_dir, models = write_setup(tmp_path, model.url, billing_workflow())
    s = settings.model_copy(update={
        "workflows_dir": wf_dir, "models_file": models, "partitions": 6,
        "lease_ttl_s": 3.0, "revoke_timeout_s": 5.0, "retry_tiers_s": [0.5, 1.0, 2.0]})
    await provision(s)
    events = invoices(RUNS)
    expected = run_ids(events)
    workers = Workers(s, tmp_path, service.url)
    kills: list[Kill] = []
    try:
        async with Follower(s, TopicNames(s.topic_prefix).results(WORKFLOW),
                            RunResult) as follower:
            first = [workers.start(), workers.start()]
            await asyncio.gather(*(w.ready() for w in first))
            started = time.monotonic()
            publisher = asyncio.create_task(publish_paced(s, events, batch=100, every_s=0.5))
            for fraction in KILL_AT:
                await follower.until(reached(fraction * RUNS), within=180,
                                     check=workers.check)
                victim = workers.running[0]  # the oldest: it surely holds partitions
                processed, service_busy = victim.processed(), service.in_flight
                killed = await victim.kill9()
                kills.append(Kill(victim.name, killed.moment - started, killed.moment,
                                  killed.wall_ms, killed.ports,
                                  len({r.run_id for r in follower.found}), processed,
                                  service_busy))
                replacement = workers.start()
                await replacement.ready(within=90)
            await publisher
            await follower.until(reached(RUNS), within=240, check=workers.check)
            wall_s = time.monotonic() - started
        codes = await workers.close()
        log = [e for e in await model.request_log() if e.get("workflow") == WORKFLOW]
    finally:
        await workers.close()
        await model.stop()
    outcome = await one_result_each(s, expected)
    clock = time.time() - time.monotonic()
    dump(tmp_path, "figures", {
        "kills": [dataclasses.asdict(k) for k in kills], "copies": outcome.copies,
        "calls": [(c.run, c.port, round((c.start + clock) * 1000),
                   round((c.end + clock) * 1000)) for c in model.calls]})

    calls_by_run = Counter(c.run for c in model.calls)
    in_flight = [model.unanswered(k.ports, k.moment, GRACE_S) for k in kills]
    allowance = sum(len(f) for f in in_flight)
    asked_at_kills: set[str] = set().union(*in_flight)
    repeated = {run: n for run, n in calls_by_run.items() if n > 1}
    figures = service.figures()
    lost = sum(w.text().count("was lost while its step ran") for w in workers.all)
    abandoned = sum(w.text().count("were abandoned") for w in workers.all)
    beaten = sum(w.text().count("published the output of") for w in workers.all)
    print(f"\n[kill -9 x3] {RUNS} runs, 2 workers, 6 partitions, model latency "
          f"{MODEL_LATENCY_MS} ms: all results after {wall_s:.1f}s")
    for k, flight in zip(kills, in_flight, strict=True):
        print(f"  kill {k.worker} at {k.at_s:.1f}s ({k.results_before} results so far, it "
              f"had processed {k.processed}): its model calls in flight {len(flight)} "
              f"(unanswered, or answered less than {GRACE_S}s before), service calls in "
              f"flight {k.service_in_flight}")
    print(f"  results: {len(outcome.results)} runs, {outcome.records} result records; "
          f"{len(outcome.copies)} runs have a second copy")
    print(f"  model calls {len(log)} <= runs {RUNS} + in flight at the kills {allowance} = "
          f"{RUNS + allowance}; runs asked twice: {len(repeated)}")
    print(f"  service: {figures['calls']} calls for {figures['keys']} keys "
          f"({figures['repeated_calls']} repeated, answered from the first), side effects "
          f"applied {figures['effects']}")
    print(f"  workers: {', '.join(f'{w.name} {w.processed()}' for w in workers.all)} "
          f"messages; exit codes of those stopped: {codes}; lease-lost warnings {lost}, "
          f"'another worker published first' {beaten}, revocations that abandoned records "
          f"{abandoned}")

    assert sorted(service.effects) == sorted(expected.values())
    assert set(service.effects.values()) == {1}, "a side effect was applied twice"
    seq_of = {a["subject"]: a["seq"] for a in service.applied.values()}
    for run, result in outcome.results.items():
        out = result.output
        assert out["judged"] == out["invoice_id"] == expected[run]
        assert out["verdict"] == "approve"
        assert out["seq"] == seq_of[out["invoice_id"]], "the result carries another effect"
    assert outcome.records == RUNS, f"runs with more than one result: {outcome.copies[:5]}"
    assert len(log) <= len(model.calls)  # a request cut by a kill may not reach the log
    assert len(log) <= RUNS + allowance, (len(log), allowance)
    assert set(repeated) <= asked_at_kills, (
        f"runs asked twice whose first call was not in flight on a killed worker: "
        f"{sorted(set(repeated) - asked_at_kills)[:10]}")
    assert all(code == 0 for code in codes.values()), codes


def reached(count: float) -> Callable[[list[RunResult]], bool]:
    return lambda found: len({r.run_id for r in found}) >= count


@dataclass
class Kill:
    worker: str
    at_s: float  # since the flow started
    moment: float  # monotonic
    wall_ms: int
    ports: set[int]  # the local ports of its TCP connections just before
    results_before: int
    processed: int
    service_in_flight: int
