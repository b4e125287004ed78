"""Many runs in flight on one partition, on the real embedded broker and Redis: one run's
steps stay in order while runs overlap, and a step that hangs past its timeout holds up
neither other runs nor other partitions, and no commit passes it until it is dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel

from agentfabric.app import provision, publish_events, read_results
from agentfabric.settings import Settings
from agentfabric.worker import Worker, background_worker
from agents.engine import Engine, run_id_for
from agents.loader import load_workflows
from schemas.models import TriggerEvent
from streams.consumer import StepConsumer
from streams.reader import read_topic
from streams.topics import TopicNames
from tests.faketools import sample_tools
from tools import ToolCall

from .helpers import collect_dead_letters, collect_results

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def write_workflows(folder: Path, *docs: dict[str, Any]) -> Path:
    folder.mkdir()
    for doc in docs:
        (folder / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


class Nap(BaseModel):
    step: str
    ms: float


@dataclass
class Naps:
    """An async tool that waits ``ms`` and records (run id, step, start, end)."""

    calls: list[tuple[str, str, float, float]] = field(default_factory=list)
    running: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)

    async def __call__(self, args: Nap, call: ToolCall) -> dict[str, Any]:
        start = time.monotonic()
        self.running[args.step] += 1
        self.peak[args.step] = max(self.peak[args.step], self.running[args.step])
        try:
            await asyncio.sleep(args.ms / 1000)  # the work being simulated, not a wait
        finally:
            self.running[args.step] -= 1
        self.calls.append((call.run_id, args.step, start, time.monotonic()))
        return {"slept_ms": args.ms}


PACED = {
    "name": "paced", "version": 1,
    "trigger": {"source": "crm", "event_types": ["paced"]},
    "steps": [
        {"id": "one", "kind": "tool", "tool": "test.nap",
         "args": {"step": "one", "ms": "{{ input.one_ms }}"}},
        {"id": "two", "kind": "tool", "tool": "test.nap",
         "args": {"step": "two", "ms": "{{ input.two_ms }}"}},
    ],
}


async def test_500_runs_on_one_partition_overlap_and_keep_each_run_in_order(
        settings: Settings, tmp_path: Path) -> None:
    one = settings.model_copy(update={
        "workflows_dir": write_workflows(tmp_path / "workflows", PACED), "partitions": 1})
    assert one.max_in_flight == 64
    naps = Naps()
    tools = sample_tools()
    tools.register("test.nap", Nap)(naps)
    engine = Engine(load_workflows(one.workflows_dir), tools,
                    tool_timeout_s=one.tool_timeout_s)
    await provision(one, engine)

    rng = random.Random(20260606)
    events = [TriggerEvent(event_id=f"p{i}", source="crm", event_type="paced",
                           payload={"one_ms": rng.uniform(0, 50), "two_ms": rng.uniform(0, 50)})
              for i in range(500)]
    sequential_s = sum(e.payload["one_ms"] + e.payload["two_ms"] for e in events) / 1000
    runs = {run_id_for(e, "paced"): e for e in events}

    async with background_worker(one, engine) as worker:
        started = time.monotonic()
        await publish_events(one, TopicNames(one.topic_prefix).trigger("crm"), events)
        results = await collect_results(one, "paced", len(events), within=60)
        wall_s = time.monotonic() - started
        assert len({r.run_id for r in results}) == len(events), (
            f"only {len({r.run_id for r in results})} of {len(events)} runs finished")
        assert worker.processed >= 3 * len(events)
    every = [r async for r in read_results(one, "paced")]  # after the worker drained

    print(f"\n500 two-step runs on 1 partition, max_in_flight {one.max_in_flight}: "
          f"wall {wall_s:.2f}s, sequential sum of the steps' waits {sequential_s:.2f}s, "
          f"ratio {wall_s / sequential_s:.3f}; peak tool calls in flight: "
          f"step one {naps.peak['one']}, step two {naps.peak['two']}")

    counts = Counter(r.run_id for r in every)
    assert set(counts) == set(runs)
    assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1][:5]
    for result in every:
        event = runs[result.run_id]
        assert result.event_id == event.event_id
        assert result.path == ["one", "two"]
        assert result.output == {"slept_ms": event.payload["two_ms"]}

    by_run: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list))
    for run_id, step, start, end in naps.calls:
        by_run[run_id][step].append((start, end))
    assert set(by_run) == set(runs)
    for run_id, steps in by_run.items():
        assert len(steps["one"]) == 1, (run_id, dict(steps))
        assert len(steps["two"]) == 1, (run_id, dict(steps))
        [(_, one_end)] = steps["one"]
        [(two_start, _)] = steps["two"]
        assert one_end <= two_start, f"{run_id}: step two started before step one ended"

    assert naps.peak["one"] > 1, "runs did not overlap"
    assert naps.peak["two"] > 1, "runs did not overlap"
    assert max(naps.peak.values()) <= one.max_in_flight, "more in flight than the window"
    assert wall_s < 0.5 * sequential_s, (wall_s, sequential_s)


class Block(BaseModel):
    hang: bool = False


@dataclass
class Blocker:
    """An async tool that returns at once, or (``hang: true``) waits on an event no one
    sets; ``hanging`` is set while such a call is in progress."""

    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    never: asyncio.Event = field(default_factory=asyncio.Event)
    hung: int = 0
    cancelled: int = 0

    async def __call__(self, args: Block) -> dict[str, Any]:
        if not args.hang:
            return {"hung": False}
        self.hung += 1
        self.hanging.set()
        try:
            await self.never.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.hanging.clear()
        return {"hung": True}


class Commits:
    """Counts the commit rounds of one step consumer, and reads its group's committed
    offset from the broker."""

    def __init__(self, settings: Settings, consumer: StepConsumer, tp: TopicPartition) -> None:
        self.settings = settings
        self.consumer = consumer
        self.tp = tp
        self.rounds = 0
        self._tick = asyncio.Event()
        self._commit = consumer.commit

        async def counted(only: Any = None) -> None:
            await self._commit(only)
            self.rounds += 1
            self._tick.set()
        consumer.commit = counted  # type: ignore[method-assign]

    async def after_rounds(self, n: int, within: float = 10) -> None:
        """Wait until ``n`` more commit rounds have run (each commits what is finished)."""
        target = self.rounds + n
        async with asyncio.timeout(within):
            while self.rounds < target:
                self._tick.clear()
                await self._tick.wait()

    async def committed(self) -> int | None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers)
        await admin.start()
        try:
            found = await admin.list_consumer_group_offsets(self.consumer.executor.group,
                                                            partitions=[self.tp])
        finally:
            await admin.close()
        entry = found.get(self.tp)
        return None if entry is None or entry.offset < 0 else entry.offset

    async def until_committed(self, offset: int, within: float = 15) -> int | None:
        seen = await self.committed()
        async with asyncio.timeout(within):
            while seen != offset:
                await self.after_rounds(1)
                seen = await self.committed()
        return seen


def consumer_of(worker: Worker, group: str) -> StepConsumer:
    [found] = [c for c in worker.consumers if c.executor.group == group]
    return found


@contextlib.asynccontextmanager
async def released(blocker: Blocker) -> AsyncIterator[None]:
    try:
        yield
    finally:
        blocker.never.set()  # nothing hangs past the test, whatever happened


async def test_a_step_that_hangs_past_its_timeout_blocks_no_one_and_no_commit_passes_it(
        settings: Settings, tmp_path: Path) -> None:
    timeout_s = 3
    hang_flow = {
        "name": "stuck", "version": 1, "trigger": {"source": "crm", "event_types": ["stuck"]},
        "steps": [{"id": "wait", "kind": "tool", "tool": "test.block", "timeout_s": timeout_s,
                   "args": {"hang": "{{ get(input, 'hang', false) }}"}}]}
    other_flow = {
        "name": "elsewhere", "version": 1,
        "trigger": {"source": "erp", "event_types": ["elsewhere"]},
        "steps": [{"id": "go", "kind": "tool", "tool": "test.block", "args": {}}]}
    one = settings.model_copy(update={
        "workflows_dir": write_workflows(tmp_path / "workflows", hang_flow, other_flow),
        "partitions": 1, "max_attempts": 1, "revoke_timeout_s": 2.0})
    names = TopicNames(one.topic_prefix)
    blocker = Blocker()
    tools = sample_tools()
    tools.register("test.block", Block)(blocker)
    engine = Engine(load_workflows(one.workflows_dir), tools, tool_timeout_s=one.tool_timeout_s)
    await provision(one, engine)

    stuck = TriggerEvent(event_id="hangs", source="crm", event_type="stuck",
                         payload={"hang": True})
    same_partition = [TriggerEvent(event_id=f"s{i}", source="crm", event_type="stuck",
                                   payload={}) for i in range(30)]
    other_topic = [TriggerEvent(event_id=f"o{i}", source="erp", event_type="elsewhere",
                                payload={}) for i in range(10)]
    step_topic = names.step("stuck", "wait")
    tp = TopicPartition(step_topic, 0)

    async with released(blocker), background_worker(one, engine) as worker:
        commits = Commits(one, consumer_of(worker, names.step_group("stuck", "wait")), tp)
        await publish_events(one, names.trigger("crm"), [stuck])
        await asyncio.wait_for(blocker.hanging.wait(), 15)
        hung_at = time.monotonic()
        hang_offset = [r.offset async for r in read_topic(one, step_topic)
                       if r.key == run_id_for(stuck, "stuck").encode()]
        assert hang_offset == [0]

        await publish_events(one, names.trigger("crm"), same_partition)
        await publish_events(one, names.trigger("erp"), other_topic)
        done_here = await collect_results(one, "stuck", len(same_partition), within=timeout_s)
        done_there = await collect_results(one, "elsewhere", len(other_topic),
                                           within=timeout_s)
        others_s = time.monotonic() - hung_at
        assert blocker.hanging.is_set(), (
            f"the hanging step ended after {others_s:.2f}s, before the others were checked")
        assert {r.event_id for r in done_here} == {e.event_id for e in same_partition}
        assert {r.event_id for r in done_there} == {e.event_id for e in other_topic}

        # the others are finished and the consumer has had its commit rounds: nothing passed
        await commits.after_rounds(3)
        while_hanging = await commits.committed()
        window = commits.consumer.windows[tp]
        assert blocker.hanging.is_set()
        assert while_hanging is None or while_hanging <= hang_offset[0], while_hanging
        assert window.offsets.position is None, "the finished prefix passed the hanging record"
        assert window.offsets.in_flight == 1
        assert window.in_flight == 1

        [letter] = await collect_dead_letters(one, 1, within=timeout_s + 10)
        dead_s = time.monotonic() - hung_at
        end = len(same_partition) + 1
        after_dead = await commits.until_committed(end)

    print(f"\nhanging step (timeout_s {timeout_s}): {len(same_partition)} runs on its partition "
          f"and {len(other_topic)} on another topic finished {others_s:.2f}s after it hung; "
          f"committed offset while it hung: {while_hanging}; dead-lettered after "
          f"{dead_s:.2f}s; committed offset then: {after_dead}")

    assert blocker.hung == 1
    assert blocker.cancelled == 1, "the timeout did not cancel the step"
    assert letter.error_type == "TransientError"
    assert letter.run_id == run_id_for(stuck, "stuck")
    assert (letter.topic, letter.partition, letter.offset) == (step_topic, 0, hang_offset[0])
    assert f"stuck.wait took longer than its timeout of {timeout_s}s" in letter.reason
    assert "gave up after 1 attempts" in letter.reason
    assert dead_s >= timeout_s * 0.9
    assert after_dead == end
