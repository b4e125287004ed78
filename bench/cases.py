"""The measurements (a) to (f). Each returns a small result record; ``bench.report`` prints them.

Throughput is read from record timestamps: the producer client stamps every record when it is
sent, so the timestamps on an output topic say when the relay or worker produced each output.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import psutil  # type: ignore[import-untyped]

from bench.fabric import LLM, NOOP1, Bench, Fabric, Workflow
from bench.kafka_io import paced_send, preload, read_all, trigger, wait_for_count
from bench.procs import Child, wait_for_log
from bench.relay import READY
from schemas.models import RunResult, StepMessage
from schemas.serde import decode
from streams.topics import apply_topics

__all__ = ["Latency", "LlmResult", "Memory", "OpenAiResult", "Throughput", "bare_openai",
           "fabric_latency", "fabric_llm", "fabric_memory", "fabric_throughput", "merged",
           "percentile", "raw_latency", "raw_throughput"]


@dataclass
class Throughput:
    label: str
    rate: float  # per second, first output to last
    measured: int  # distinct outputs the rate is computed over
    target: int  # messages or runs preloaded
    capped: bool  # the time cap ended the wait before every output arrived
    span_s: float
    preload_s: float
    startup_s: float  # from starting the relay or worker to its first output
    duplicates: int = 0
    dead_letters: int = 0
    stopped: str = ""


@dataclass
class Latency:
    label: str
    samples: list[float]  # end-to-end milliseconds, warm-up excluded
    hops: list[list[float]]  # milliseconds of each hop along the way, same messages
    sent: int
    missing: int  # sent in the measured window but never came out

    def hop_percentile(self, q: float) -> float:
        """Percentile ``q`` of every hop's samples pooled (e.g. the two relays of the raw
        baseline)."""
        return percentile([ms for hop in self.hops for ms in hop], q)


@dataclass
class LlmResult:
    throughput: Throughput
    order_ok: bool
    checked_runs: int
    violations: list[str] = field(default_factory=list)
    duplicate_step_messages: int = 0
    model_requests: int = 0


@dataclass
class Memory:
    max_rss_mb: float
    first_rss_mb: float  # when the first result appeared
    last_rss_mb: float
    samples: int
    window_s: float  # from the first result
    startup_s: float
    drained: int
    drain_rate: float  # runs/s from the first result to the last, as in (b)
    backlog: int
    dead_letters: int = 0
    stopped: str = ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n), at least 1
    return ordered[rank - 1]


def _rate(records: list[Any]) -> tuple[float, int, float, int]:
    """(per second, distinct keys, span in s, duplicates) from first to last distinct output."""
    first: dict[bytes, int] = {}
    for r in records:
        if r.key not in first or r.timestamp < first[r.key]:
            first[r.key] = r.timestamp
    stamps = sorted(first.values())
    span = (stamps[-1] - stamps[0]) / 1000 if len(stamps) > 1 else 0.0
    rate = (len(stamps) - 1) / span if span > 0 else 0.0
    return rate, len(stamps), span, len(records) - len(stamps)


FIRST_OUTPUT_TIMEOUT_S = 120.0


async def _drain(bench: Bench, topic: str, target: int, cap_s: float, alive: Callable[[], bool],
                 on_tick: Callable[[int], None] | None = None) -> tuple[bool, float]:
    """Wait for the first output on ``topic`` (start-up: up to two minutes), then up to
    ``cap_s`` more for ``target`` outputs; (capped, seconds from now to the first output)."""
    started = time.monotonic()
    _, capped = await wait_for_count(bench.counter, topic, 1, FIRST_OUTPUT_TIMEOUT_S, alive,
                                     poll_s=0.1, on_tick=on_tick)
    if capped:
        raise RuntimeError(f"nothing arrived on {topic} within {FIRST_OUTPUT_TIMEOUT_S:.0f}s "
                           f"of starting the process under test")
    first = time.monotonic() - started
    _, capped = await wait_for_count(bench.counter, topic, target, cap_s, alive,
                                     on_tick=on_tick)
    return capped, first


def _relay(bench: Bench, name: str, source: str, dest: str) -> Child:
    return bench.children.spawn(name, [
        sys.executable, "-m", "bench.relay", bench.bootstrap, source, dest, f"{name}-group",
        "--fetch-max-wait-ms", str(bench.fetch_max_wait_ms),
        "--max-poll-records", str(bench.max_poll_records)])


def _raw(i: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return f"r{i}".encode(), b'{"n": %d, "pad": "................................"}' % i, []


async def raw_throughput(bench: Bench, messages: int, cap_s: float) -> Throughput:
    """(a) Preload ``messages`` on a 1-partition topic, then relay them; msgs/s."""
    source, dest = "rawa.in", "rawa.out"
    await apply_topics(bench.bootstrap, [source, dest], partitions=1, replication_factor=1)
    preload_s = await preload(bench.bootstrap, source, messages, _raw)
    relay = _relay(bench, "relay-a", source, dest)
    try:
        capped, startup = await _drain(bench, dest, messages, cap_s,
                                       lambda: relay.popen.poll() is None)
    finally:
        await bench.children.astop(relay)
    rate, distinct, span, dups = _rate(await read_all(bench.bootstrap, dest))
    return Throughput("raw relay", rate, distinct, messages, capped, span, preload_s, startup,
                      dups, stopped=f"exit code {relay.exit_code}")


async def floor_throughput(bench: Bench, prefix: str, runs: int, cap_s: float) -> Throughput:
    """(b0) The no-op one-step workflow's two hops with only Avro and the engine
    (``bench.floor``, its own process), on the (b) topics' layout; runs/s."""
    fab = Fabric(bench, prefix, NOOP1, partitions=1)
    await fab.prepare()
    preload_s = await preload(bench.bootstrap, fab.trigger_topic, runs,
                              lambda i: trigger(f"{prefix}-{i}", i))
    child = bench.children.spawn("floor", [
        sys.executable, "-m", "bench.floor", bench.bootstrap, fab.trigger_topic,
        fab.step_topic(NOOP1.steps[0]), fab.results_topic, f"{prefix}-floor",
        "--fetch-max-wait-ms", str(bench.fetch_max_wait_ms),
        "--max-poll-records", str(bench.max_poll_records)], env=fab.env)
    try:
        capped, startup = await _drain(bench, fab.results_topic, runs, cap_s,
                                       lambda: child.popen.poll() is None)
    finally:
        await bench.children.astop(child)
    rate, distinct, span, dups = _rate(await read_all(bench.bootstrap, fab.results_topic))
    return Throughput("floor", rate, distinct, runs, capped, span, preload_s, startup, dups,
                      stopped=f"exit code {child.exit_code}")


async def fabric_throughput(bench: Bench, prefix: str, workflow: Workflow, runs: int,
                            cap_s: float, partitions: int) -> Throughput:
    """(b), (c) Preload ``runs`` trigger events, then start the worker; runs/s."""
    fab = Fabric(bench, prefix, workflow, partitions=partitions)
    await fab.prepare()
    preload_s = await preload(bench.bootstrap, fab.trigger_topic, runs,
                              lambda i: trigger(f"{prefix}-{i}", i))
    fab.start_worker()
    try:
        capped, startup = await _drain(bench, fab.results_topic, runs, cap_s, fab.alive)
    finally:
        stopped = await fab.stop_worker()
    rate, distinct, span, dups = _rate(await read_all(bench.bootstrap, fab.results_topic))
    return Throughput(workflow.name, rate, distinct, runs, capped, span, preload_s, startup,
                      dups, await fab.dead_letters(), stopped)


Make = Callable[[int], tuple[bytes, bytes, list[tuple[str, bytes]]]]
KeyOf = Callable[[Any], bytes]


async def _paced_latency(bench: Bench, label: str, chain: list[tuple[str, KeyOf]], *,
                         rate: float, seconds: float, warmup_s: float, key_prefix: str,
                         make: Make, probe: Make, alive: Callable[[], bool]) -> Latency:
    """Send ``make(i)`` (keyed ``key_prefix + i``) at ``rate``/s to the first topic of
    ``chain``; whatever runs relays it along the chain. For each message, the milliseconds
    between its record timestamps on consecutive topics (hops) and end to end. ``chain`` pairs
    each topic with how to find a record's message key there. The first ``warmup_s`` seconds
    of messages are not counted."""
    source, dest = chain[0][0], chain[-1][0]
    # one message first, so the consumers are assigned and warm before pacing starts
    await preload(bench.bootstrap, source, 1, probe)
    await wait_for_count(bench.counter, dest, 1, 90.0, alive)
    sent = await paced_send(bench.bootstrap, source, rate, warmup_s + seconds, make)
    await wait_for_count(bench.counter, dest, 1 + sent, 30.0, alive)
    stamps: list[dict[bytes, int]] = []
    for topic, key_of in chain:
        seen: dict[bytes, int] = {}
        for r in await read_all(bench.bootstrap, topic):
            seen.setdefault(key_of(r), r.timestamp)  # a redelivered copy does not count
        stamps.append(seen)
    measured = [f"{key_prefix}{i}".encode() for i in range(int(rate * warmup_s), sent)]
    arrived = [k for k in measured if all(k in s for s in stamps)]
    samples = [float(stamps[-1][k] - stamps[0][k]) for k in arrived]
    hops = [[float(later[k] - earlier[k]) for k in arrived]
            for earlier, later in itertools.pairwise(stamps)]
    if any(h < 0 for hop in hops for h in hop):
        raise RuntimeError(f"{label}: an output is stamped before its input; the runtime seems "
                           f"to copy input timestamps, so this latency method does not apply")
    return Latency(label, samples, hops, len(measured), len(measured) - len(arrived))


def merged(parts: list[Latency]) -> Latency:
    """Latency segments measured one after another (same chain shape) as one."""
    first = parts[0]
    return Latency(first.label, [ms for p in parts for ms in p.samples],
                   [[ms for p in parts for ms in p.hops[i]] for i in range(len(first.hops))],
                   sum(p.sent for p in parts), sum(p.missing for p in parts))


def _key(r: Any) -> bytes:
    return bytes(r.key)


async def raw_latency(bench: Bench, rate: float, seconds: float, warmup_s: float,
                      tag: str = "") -> Latency:
    """(d) The raw relay at a paced ``rate``: two relays in a chain (input -> relay -> middle
    -> relay -> output), so the broker serves two consumed hops at once, as it does for the
    fabric's router and step hops. (The embedded broker's fetch lists every record batch of
    the partition it reads, so its cost grows with each consumed partition's length; one raw
    hop against the fabric's two would put that growth on one side only.)"""
    source, middle, dest = f"rawd{tag}.in", f"rawd{tag}.mid", f"rawd{tag}.out"
    await apply_topics(bench.bootstrap, [source, middle, dest], partitions=1,
                       replication_factor=1)
    relays = [_relay(bench, f"relay{tag}-d1", source, middle),
              _relay(bench, f"relay{tag}-d2", middle, dest)]
    try:
        for relay in relays:
            await wait_for_log(relay, READY, 60.0)
        return await _paced_latency(
            bench, "raw hop", [(source, _key), (middle, _key), (dest, _key)], rate=rate,
            seconds=seconds, warmup_s=warmup_s, key_prefix="r", make=_raw,
            probe=lambda i: (b"probe", b"{}", []),
            alive=lambda: all(r.popen.poll() is None for r in relays))
    finally:
        for relay in relays:
            await bench.children.astop(relay)


async def fabric_latency(bench: Bench, prefix: str, rate: float, seconds: float,
                         warmup_s: float, partitions: int) -> tuple[Latency, str]:
    """(d) The no-op one-step workflow at a paced ``rate``: trigger -> router -> step topic
    (hop 1) -> step -> result topic (hop 2)."""
    fab = Fabric(bench, prefix, NOOP1, partitions=partitions)
    await fab.prepare()
    fab.start_worker()

    def step_event(r: Any) -> bytes:
        return decode(r.value, r.headers, StepMessage).event_id.encode()

    def result_event(r: Any) -> bytes:
        return decode(r.value, r.headers, RunResult).event_id.encode()

    chain: list[tuple[str, KeyOf]] = [(fab.trigger_topic, _key),
                                      (fab.step_topic(NOOP1.steps[0]), step_event),
                                      (fab.results_topic, result_event)]
    try:
        latency = await _paced_latency(
            bench, "fabric, router + 1 step", chain, rate=rate, seconds=seconds,
            warmup_s=warmup_s, key_prefix="d", make=lambda i: trigger(f"d{i}", i),
            probe=lambda i: trigger("probe", -1), alive=fab.alive)
    finally:
        stopped = await fab.stop_worker()
    return latency, stopped


async def fabric_llm(bench: Bench, prefix: str, runs: int, cap_s: float, model_url: str,
                     ) -> LlmResult:
    """(e) llm step -> transform step on ONE partition against the model server; order check."""
    models_file = bench.tmp / f"{prefix}-models.yaml"
    models_file.write_text(
        "providers:\n"
        f"  bench: {{base_url: '{model_url}', api_key_env: null}}\n"
        "models:\n"
        "  bench-model: {provider: bench, model: fabric-local-1}\n")
    fab = Fabric(bench, prefix, LLM, partitions=1,
                 extra_env={"AGENTFABRIC_MODELS_FILE": str(models_file)})
    await fab.prepare()
    preload_s = await preload(bench.bootstrap, fab.trigger_topic, runs,
                              lambda i: trigger(f"{prefix}-{i}", i))
    fab.start_worker()
    try:
        capped, startup = await _drain(bench, fab.results_topic, runs, cap_s, fab.alive)
    finally:
        stopped = await fab.stop_worker()
    results = await read_all(bench.bootstrap, fab.results_topic)
    rate, distinct, span, dups = _rate(results)
    throughput = Throughput(LLM.name, rate, distinct, runs, capped, span, preload_s, startup,
                            dups, await fab.dead_letters(), stopped)
    steps = {s: await read_all(bench.bootstrap, fab.step_topic(s)) for s in LLM.steps}
    return _check_order(throughput, steps, results)


def _check_order(throughput: Throughput, steps: dict[str, list[Any]],
                 results: list[Any]) -> LlmResult:
    """Each finished run: one result; its steps seen on their topics in workflow order."""
    order = list(LLM.steps)
    seen: dict[str, dict[str, list[tuple[int, StepMessage]]]] = defaultdict(dict)
    duplicate_steps = 0
    for step, records in steps.items():
        for r in records:
            msg = decode(r.value, r.headers, StepMessage)
            seen[msg.run_id].setdefault(step, []).append((r.timestamp, msg))
    for per_step in seen.values():
        duplicate_steps += sum(len(v) - 1 for v in per_step.values())
    finished: dict[str, list[tuple[int, RunResult]]] = defaultdict(list)
    for r in results:
        result = decode(r.value, r.headers, RunResult)
        finished[result.run_id].append((r.timestamp, result))
    violations: list[str] = []
    for run_id, got in finished.items():
        if len(got) != 1:
            violations.append(f"run {run_id}: {len(got)} results")
        stamp, result = got[0]
        if result.status != "completed" or list(result.path) != order:
            violations.append(f"run {run_id}: status {result.status}, path {result.path}")
        previous = -1
        for index, step in enumerate(order):
            messages = seen.get(run_id, {}).get(step)
            if not messages:
                violations.append(f"run {run_id}: no message on the {step} topic")
                continue
            first_stamp, msg = min(messages, key=lambda m: m[0])
            if msg.step != step or list(msg.path) != order[:index]:
                violations.append(f"run {run_id}: {step} message has step {msg.step}, "
                                  f"path {msg.path}")
            if first_stamp < previous:
                violations.append(f"run {run_id}: {step} was produced before the step "
                                  f"before it")
            previous = first_stamp
        if stamp < previous:
            violations.append(f"run {run_id}: result produced before its last step message")
    return LlmResult(throughput, not violations and bool(finished), len(finished), violations,
                     duplicate_steps)


class RssSampler:
    """Samples the resident memory of a process and its children every ``every_s``."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def rss_mb(self) -> float:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return float(total) / (1024 * 1024)

    async def _loop(self) -> None:
        while True:
            try:
                self.samples.append(self.rss_mb())
            except psutil.Error:
                return
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def fabric_memory(bench: Bench, prefix: str, backlog: int, window_s: float,
                        partitions: int) -> Memory:
    """(f) Preload ``backlog`` triggers, run the worker for ``window_s`` and sample its RSS."""
    fab = Fabric(bench, prefix, NOOP1, partitions=partitions)
    await fab.prepare()
    await preload(bench.bootstrap, fab.trigger_topic, backlog,
                  lambda i: trigger(f"{prefix}-{i}", i))
    worker = fab.start_worker()
    sampler = RssSampler(worker.pid)
    sampler.start()
    at_first_result: list[float] = []

    def tick(count: int) -> None:
        if count and not at_first_result and sampler.samples:
            at_first_result.append(sampler.samples[-1])

    try:
        _, startup = await _drain(bench, fab.results_topic, backlog, window_s, fab.alive,
                                  on_tick=tick)
    finally:
        await sampler.stop()
        stopped = await fab.stop_worker()
    drain_rate, drained, _, _ = _rate(await read_all(bench.bootstrap, fab.results_topic))
    samples = sampler.samples or [0.0]
    return Memory(max(samples), (at_first_result or samples)[0], samples[-1],
                  len(sampler.samples), window_s, startup, drained, drain_rate, backlog,
                  await fab.dead_letters(), stopped)


@dataclass
class OpenAiResult:
    rate: float
    completed: int
    errors: int
    concurrency: int
    seconds: float
    p50_ms: float
    p99_ms: float


async def bare_openai(url: str, concurrency: int, seconds: float, warmup_s: float,
                      ) -> OpenAiResult:
    """(e0) ``concurrency`` loops of the bare AsyncOpenAI client; requests/s after warm-up.
    It uses the same HTTP transport as the fabric's model client (the SDK's aiohttp one), so
    e/e0 measures what the fabric adds, not a difference of transports."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30.0,
                                http_client=openai.DefaultAioHttpClient(timeout=30.0))
    finished: list[tuple[float, float]] = []  # (when, how long)
    errors = 0
    begin = time.perf_counter()
    window_start, stop_at = begin + warmup_s, begin + warmup_s + seconds

    async def loop(lane: int) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model="fabric-local-1",
                    messages=[{"role": "system", "content": "You answer in one word."},
                              {"role": "user", "content": f"Say ok to number {lane}-{n}."}],
                    extra_headers={"x-agentfabric-workflow": "bench_bare",
                                   "x-agentfabric-step": "think"})
            except openai.APIError:
                errors += 1
            else:
                t1 = time.perf_counter()
                finished.append((t1, t1 - t0))
            n += 1

    try:
        await asyncio.gather(*(loop(lane) for lane in range(concurrency)))
    finally:
        await client.close()
    counted = [took for when, took in finished if window_start <= when <= stop_at]
    if not counted:
        raise RuntimeError(f"the bare openai client completed no request in {seconds:.0f}s "
                           f"({errors} errors)")
    millis = [took * 1000 for took in counted]
    return OpenAiResult(len(counted) / seconds, len(counted), errors, concurrency, seconds,
                        percentile(millis, 50), percentile(millis, 99))
