"""Redis stopped for 10 s mid-flow and started again, on a stack of the test's own.

Two worker processes run the rule-based sample workflows (``lead_enrichment`` v1 and
``invoice_triage``) while 600 runs are published over ~20 s. At a quarter of the results
Redis is stopped (SIGTERM: it writes its append-only file; or, as a crash, SIGKILL: it may
lose its last second of writes), kept down for 10 s, and started again on the same port
with its data. Expected: the workers never exit, nothing is
dead-lettered because of Redis, processing resumes by itself once Redis is back, and every
run has its result (one distinct result each: an output sent just before Redis went away
and not yet marked acknowledged is sent again, byte for byte, when its record is retried).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from agentfabric.settings import Settings
from schemas.models import RunResult
from streams.embedded import EmbeddedStack, StackInfo, pid_alive
from streams.topics import TopicNames
from tests.integration.helpers import cases, publish_cases
from tests.servicefixture import RunningServices

from .harness import provision
from .procs import Workers
from .records import Follower, dead_letters_of, one_result_each

pytestmark = [pytest.mark.timeout(300)]

RUNS = 600
OUTAGE_S = 10.0
RESUME_WITHIN_S = 30.0


@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_redis_stopped_for_10s_mid_flow_loses_no_run(
        how: str, own_stack: tuple[EmbeddedStack, StackInfo], rules_workflows: Path,
        services: RunningServices, tmp_path: Path) -> None:
    embedded, info = own_stack
    s = Settings(bootstrap_servers=info.bootstrap_servers, redis_url=info.redis_url,
                 topic_prefix=f"f{uuid.uuid4().hex[:10]}", partitions=3, fetch_max_wait_ms=10,
                 workflows_dir=rules_workflows, service_urls=services.urls, metrics_port=0)
    await provision(s)
    batch = cases(RUNS, seed=31)
    expected = {wf: {c.run_id: c.event.event_id for c in batch if c.workflow == wf}
                for wf in ("lead_enrichment", "invoice_triage")}
    names = TopicNames(s.topic_prefix)
    workers = Workers(s, tmp_path)
    figures: dict[str, float] = {}

    async def paced() -> None:
        for i in range(0, RUNS, 30):
            await publish_cases(s, batch[i:i + 30])
            await asyncio.sleep(1.0)  # a flow of 30 runs a second, not one burst

    try:
        async with Follower(s, names.results("lead_enrichment"), RunResult) as leads, \
                Follower(s, names.results("invoice_triage"), RunResult) as invoices:
            def done() -> int:
                return len({r.run_id for r in (*leads.found, *invoices.found)})

            async def until(count: int, within: float) -> None:
                deadline = time.monotonic() + within
                while done() < count:
                    workers.check()
                    assert time.monotonic() < deadline, f"{done()} of {count} results"
                    leads.changed.clear()
                    invoices.changed.clear()
                    waits = [asyncio.create_task(f.changed.wait()) for f in (leads, invoices)]
                    await asyncio.wait(waits, timeout=0.5,
                                       return_when=asyncio.FIRST_COMPLETED)
                    for w in waits:
                        w.cancel()

            pair = [workers.start(), workers.start()]
            await asyncio.gather(*(w.ready() for w in pair))
            started = time.monotonic()
            publisher = asyncio.create_task(paced())
            await until(RUNS // 4, within=120)

            stopped = embedded.stop_redis(kill=how == "crash")
            assert stopped is not None
            assert not pid_alive(stopped.pid, stopped.binary)
            down_at = time.monotonic()
            figures["stopped_at_s"] = down_at - started
            figures["results_at_stop"] = done()
            while time.monotonic() - down_at < OUTAGE_S:  # the outage itself
                workers.check()
                await asyncio.sleep(0.5)
            figures["results_during_outage"] = done() - figures["results_at_stop"]
            restarted = embedded.start_redis()
            assert restarted.port == info.redis.port
            assert restarted.pid != info.redis.pid
            up_at = time.monotonic()
            figures["outage_s"] = up_at - down_at
            before = done()
            await until(before + 1, within=RESUME_WITHIN_S)
            figures["first_result_after_s"] = time.monotonic() - up_at
            await publisher
            await until(RUNS, within=180)
            figures["all_after_restart_s"] = time.monotonic() - up_at
            figures["wall_s"] = time.monotonic() - started
        codes = await workers.close()
    finally:
        await workers.close()

    outcomes = {wf: await one_result_each(s, runs, wf) for wf, runs in expected.items()}
    letters = await dead_letters_of(s)
    warnings = sum(w.text().count("Redis is unavailable") for w in workers.all)
    copies = sum(len(o.copies) for o in outcomes.values())
    print(f"\n[Redis down {figures['outage_s']:.1f}s, {how}] {RUNS} runs, 2 workers: Redis "
          f"{'stopped' if how == 'stop' else 'killed (SIGKILL)'} "
          f"at {figures['stopped_at_s']:.1f}s with {figures['results_at_stop']:.0f} results; "
          f"{figures['results_during_outage']:.0f} results during the outage; first result "
          f"{figures['first_result_after_s']:.2f}s after Redis was back, all "
          f"{figures['all_after_restart_s']:.1f}s after (wall {figures['wall_s']:.1f}s)")
    print(f"  results: {sum(len(o.results) for o in outcomes.values())} runs, "
          f"{sum(o.records for o in outcomes.values())} records ({copies} runs with a "
          f"byte-identical copy); dead letters {len(letters)}; 'Redis is unavailable' "
          f"warnings {warnings}; worker exit codes {codes}")

    for case in batch:
        output = outcomes[case.workflow].results[case.run_id].output
        for key, value in case.expected.items():
            assert output[key] == value, (case.event.event_id, key, output)
    assert not letters, f"dead-lettered because of Redis: {letters[0].reason}"
    assert all(code == 0 for code in codes.values()), codes
    assert warnings > 0, "the workers never noticed Redis was down"
