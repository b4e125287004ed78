"""The benchmark suite of issue 6: every figure in one run on the embedded broker, one table.

    .venv/bin/python -m bench.suite            # full run (what `make bench` runs), ~5 min
    .venv/bin/python -m bench.suite --quick    # ~1-2 min smoke run; writes no docs unless asked

It starts the embedded broker and Redis on free ports, measures (a) a raw aiokafka hop,
(b)/(c) no-op one- and three-step workflows, (d) latency added per hop at a paced rate, (e0) the
bare openai client and (e) an llm step against the local model server, and (f) a worker's
memory with a large backlog; prints one table and writes docs/performance.md and
docs/performance.png. Every process it starts is stopped by its pid at the end, also on error,
Ctrl-C or SIGTERM. How each figure is measured is written into docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from agentfabric.settings import Settings
from bench import cases, report
from bench.fabric import NOOP1, NOOP3, Bench
from bench.kafka_io import Counter
from bench.procs import Children, agentfabric_bin, wait_for_http
from bench.report import Report
from streams.embedded import EmbeddedStack, free_port

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
CASES = "a,b0,b,c,d,e0,e,f"


def _sizes(args: argparse.Namespace) -> None:
    """Fill unset sizes with the full or the quick defaults."""
    full = {"raw_messages": 200_000, "runs": 20_000, "llm_runs": 5_000, "backlog": 100_000,
            "latency_seconds": 20.0, "latency_segments": 4, "warmup_seconds": 2.0,
            "e0_seconds": 15.0,
            "cap_seconds": 60.0, "memory_seconds": 40.0}
    quick = {"raw_messages": 50_000, "runs": 2_000, "llm_runs": 600, "backlog": 20_000,
             "latency_seconds": 3.0, "latency_segments": 1, "warmup_seconds": 1.0,
             "e0_seconds": 5.0,
             "cap_seconds": 15.0, "memory_seconds": 10.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.suite",
                                description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes and short caps (~1-2 min); docs are not written unless "
                        "--docs-dir is given")
    p.add_argument("--cases", default=CASES,
                   help=f"comma-separated subset of {CASES} (ratios need both sides)")
    p.add_argument("--raw-messages", type=int, help="(a) messages relayed (full: 200,000)")
    p.add_argument("--runs", type=int, help="(b), (c) runs preloaded (full: 20,000)")
    p.add_argument("--llm-runs", type=int, help="(e) runs preloaded (full: 5,000)")
    p.add_argument("--backlog", type=int, help="(f) backlog preloaded (full: 100,000)")
    p.add_argument("--rate", type=float, default=200.0, help="(d) paced messages/s (200)")
    p.add_argument("--latency-seconds", type=float, help="(d) measured seconds per side (20)")
    p.add_argument("--latency-segments", type=int,
                   help="(d) segments the measured seconds are split into, each on fresh "
                        "topics (full: 4)")
    p.add_argument("--warmup-seconds", type=float, help="(d), (e0) warm-up not counted (2)")
    p.add_argument("--e0-seconds", type=float, help="(e0) measured seconds (15)")
    p.add_argument("--cap-seconds", type=float,
                   help="longest wait for a throughput case's outputs after its first one (60); "
                        "the rate is then over what finished")
    p.add_argument("--memory-seconds", type=float,
                   help="(f) seconds of draining sampled after the first result (40)")
    p.add_argument("--partitions", type=int, default=1,
                   help="partitions of the (b), (c), (d), (f) topics (1, like the raw relay's; "
                        "(e) is always 1)")
    p.add_argument("--model-latency-ms", type=int, default=200,
                   help="the model server's scripted latency (200)")
    p.add_argument("--docs-dir", type=Path,
                   help="where performance.md/.png go (default: docs/ for a full run, none "
                        "for --quick)")
    args = p.parse_args(argv)
    _sizes(args)
    unknown = set(args.cases.split(",")) - set(CASES.split(","))
    if unknown:
        p.error(f"unknown cases {', '.join(sorted(unknown))}; choose from {CASES}")
    if args.docs_dir is None and not args.quick:
        args.docs_dir = REPO / "docs"
    return args


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


MODEL_SCRIPT = """\
default_model: fabric-local-1
rules:
  - name: bench
    latency_ms: {latency}
    turns:
      - content: ok
"""


def _model_requests(url: str, workflow: str) -> int:
    with urllib.request.urlopen(f"{url.removesuffix('/v1')}/_requests", timeout=30) as resp:
        log: list[dict[str, Any]] = json.loads(resp.read())
    return sum(1 for entry in log if entry.get("workflow") == workflow)


async def run_cases(args: argparse.Namespace, bench: Bench, rep: Report) -> None:
    chosen = set(args.cases.split(","))
    if "a" in chosen:
        _say(f"(a) raw aiokafka relay: {args.raw_messages:,} messages")
        rep.raw = await cases.raw_throughput(bench, args.raw_messages, args.cap_seconds)
        _say(f"    {rep.raw.rate:,.0f} msg/s")
    if "b0" in chosen:
        _say(f"(b0) floor of (b), Avro and the engine only: {args.runs:,} runs")
        rep.floor = await cases.floor_throughput(bench, "bfl", args.runs, args.cap_seconds)
        _say(f"    {rep.floor.rate:,.1f} runs/s")
    if "b" in chosen:
        _say(f"(b) no-op one-step workflow: {args.runs:,} runs")
        rep.noop1 = await cases.fabric_throughput(bench, "bb", NOOP1, args.runs,
                                                  args.cap_seconds, args.partitions)
        _say(f"    {rep.noop1.rate:,.1f} runs/s")
    if "c" in chosen:
        _say(f"(c) no-op three-step workflow: {args.runs:,} runs")
        rep.noop3 = await cases.fabric_throughput(bench, "bc", NOOP3, args.runs,
                                                  args.cap_seconds, args.partitions)
        _say(f"    {rep.noop3.rate:,.1f} runs/s")
    if "d" in chosen:
        await run_latency(args, bench, rep)
    if "e0" in chosen or "e" in chosen:
        await run_model_cases(args, bench, rep, chosen)
    if "f" in chosen:
        _say(f"(f) worker memory with a {args.backlog:,}-message backlog, "
             f"{args.memory_seconds:.0f} s")
        rep.memory = await cases.fabric_memory(bench, "bf", args.backlog, args.memory_seconds,
                                               args.partitions)
        _say(f"    max RSS {rep.memory.max_rss_mb:,.0f} MB")


def _hop_pcts(lat: cases.Latency) -> str:
    return f"{lat.hop_percentile(50):.0f}/{lat.hop_percentile(99):.0f} ms"


async def run_latency(args: argparse.Namespace, bench: Bench, rep: Report) -> None:
    """(d) in ``--latency-segments`` segments, raw and fabric alternating, each on fresh
    topics (the embedded broker's fetch cost grows with a partition's length: decision
    0014); the segments' samples are pooled."""
    segments = max(1, args.latency_segments)
    each = args.latency_seconds / segments
    raw, fabric = [], []
    for i in range(segments):
        tag = f"{i}" if segments > 1 else ""
        _say(f"(d) latency at {args.rate:.0f} msg/s, segment {i + 1}/{segments}: raw relays, "
             f"{each:.0f} s")
        raw.append(await cases.raw_latency(bench, args.rate, each, args.warmup_seconds, tag))
        _say(f"    raw hop p50/p99 {_hop_pcts(raw[-1])}")
        _say(f"(d) latency at {args.rate:.0f} msg/s, segment {i + 1}/{segments}: fabric, "
             f"{each:.0f} s")
        latency, stopped = await cases.fabric_latency(
            bench, f"bd{tag}", args.rate, each, args.warmup_seconds, args.partitions)
        fabric.append(latency)
        _say(f"    fabric hop p50/p99 {_hop_pcts(latency)}")
        if stopped != "exit code 0" or not rep.fabric_latency_stop:
            rep.fabric_latency_stop = stopped
    rep.raw_latency, rep.fabric_latency = cases.merged(raw), cases.merged(fabric)
    hop = rep.hop(99)
    if hop:
        _say(f"    p99 added per hop {hop.added:.1f} ms")


async def run_model_cases(args: argparse.Namespace, bench: Bench, rep: Report,
                          chosen: set[str]) -> None:
    script = bench.tmp / "model-script.yaml"
    script.write_text(MODEL_SCRIPT.format(latency=args.model_latency_ms))
    port = free_port()
    server = bench.children.spawn("model-server", [
        agentfabric_bin(), "model-server", "--script", str(script), "--port", str(port)],
        env=dict(os.environ))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        await wait_for_http(server, f"http://127.0.0.1:{port}/healthz", 60.0)
        if "e0" in chosen:
            _say(f"(e0) bare openai client, concurrency {bench.max_in_flight}, "
                 f"{args.e0_seconds:.0f} s")
            rep.bare = await cases.bare_openai(url, bench.max_in_flight, args.e0_seconds,
                                               args.warmup_seconds)
            _say(f"    {rep.bare.rate:,.1f} req/s")
        if "e" in chosen:
            _say(f"(e) llm step on one partition: {args.llm_runs:,} runs")
            rep.llm = await cases.fabric_llm(bench, "be", args.llm_runs, args.cap_seconds, url)
            rep.llm.model_requests = await asyncio.to_thread(_model_requests, url, "bench_llm")
            _say(f"    {rep.llm.throughput.rate:,.1f} runs/s, order "
                 f"{'kept' if rep.llm.order_ok else 'NOT kept'}")
    finally:
        await bench.children.astop(server)
    if server.exit_code not in (0, None):
        rep.notes.append(f"the model server exited with code {server.exit_code}")


def _notes(rep: Report) -> None:
    cores = os.cpu_count() or 1
    if rep.load and max(rep.load) > cores / 2:
        rep.notes.append(f"the machine was busy: load average {max(rep.load):.1f} on {cores} "
                         f"cores during the run, so figures are lower and noisier than on a "
                         f"quiet machine; rerun when it is idle to compare with another run")
    for t in (rep.floor, rep.noop1, rep.noop3, rep.llm.throughput if rep.llm else None):
        if t is not None and t.stopped != "exit code 0":
            rep.notes.append(f"the {t.label} worker, on SIGTERM: {t.stopped}")
    if rep.fabric_latency_stop and rep.fabric_latency_stop != "exit code 0":
        rep.notes.append(f"the (d) worker, on SIGTERM: {rep.fabric_latency_stop}")
    if rep.memory and rep.memory.stopped != "exit code 0":
        rep.notes.append(f"the (f) worker, on SIGTERM: {rep.memory.stopped}")
    for t in (rep.floor, rep.noop1, rep.noop3, rep.llm.throughput if rep.llm else None):
        if t is not None and t.capped:
            rep.notes.append(f"{t.label}: the {t.target:,} runs did not all finish within the "
                             f"time cap; the rate is over the {t.measured:,} that did")


async def run_suite(args: argparse.Namespace, tmp: Path, children: Children,
                    stack_info: Any) -> Report:
    main_task = asyncio.current_task()
    if main_task is not None:  # SIGTERM cancels the run; the finally blocks stop what it started
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    settings = Settings()  # the fabric's settings as a worker started from here would see them
    counter = Counter(stack_info.bootstrap_servers)
    await counter.start()
    bench = Bench(bootstrap=stack_info.bootstrap_servers, redis_url=stack_info.redis_url,
                  tmp=tmp, children=children, counter=counter,
                  fetch_max_wait_ms=settings.fetch_max_wait_ms,
                  max_poll_records=settings.max_poll_records,
                  max_in_flight=settings.max_in_flight)
    rep = Report(started=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                 duration_s=0.0,
                 command="make bench" if not args.quick else "python -m bench.suite --quick",
                 quick=args.quick, partitions=args.partitions, rate=args.rate,
                 model_latency_ms=args.model_latency_ms, concurrency=settings.max_in_flight)
    if sys.argv[1:] and not args.quick:
        rep.command = "python -m bench.suite " + shlex.join(sys.argv[1:])
    rep.load.append(os.getloadavg()[0])
    try:
        await run_cases(args, bench, rep)
    finally:
        await counter.stop()
    rep.load.append(os.getloadavg()[0])
    _notes(rep)
    return rep


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentfabric-bench-") as scratch:
        tmp = Path(scratch)
        (tmp / "logs").mkdir()
        children = Children(tmp / "logs")
        stack = EmbeddedStack(tmp / "stack", broker_port=free_port(), redis_port=free_port())
        _say("starting the embedded broker and Redis")
        info = stack.start()
        try:
            try:
                rep = asyncio.run(run_suite(args, tmp, children, info))
            except asyncio.CancelledError:
                raise KeyboardInterrupt("SIGTERM") from None
            finally:
                signal.signal(signal.SIGTERM, _interrupt)  # the loop reset it on closing
        except BaseException:
            logs = sorted((tmp / "logs").glob("*.log"))
            for log in logs:
                tail = log.read_text(errors="replace").strip().splitlines()[-8:]
                if tail:
                    print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
            raise
        finally:
            children.stop_all()
            stack.stop()
    rep.duration_s = time.monotonic() - started
    print()
    print(report.results_table(rep))
    print()
    print(report.targets_table(rep))
    for note in rep.notes:
        print(f"note: {note}")
    print(f"\n(took {rep.duration_s / 60:.1f} min; load average at start and end: "
          f"{', '.join(f'{x:.2f}' for x in rep.load)})")
    if args.docs_dir is not None:
        args.docs_dir.mkdir(parents=True, exist_ok=True)
        chart = args.docs_dir / "performance.png"
        report.write_chart(rep, chart)
        report.write_markdown(rep, args.docs_dir / "performance.md", chart)
        print(f"wrote {args.docs_dir / 'performance.md'} and {chart}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process the suite started was stopped", file=sys.stderr)
        sys.exit(130)
