"""The system under test: bench workflows, their topics, and a worker in its own process.

Each case gets its own topic prefix and workflow folder, so a worker runs only that case's
workflow and leftovers of one case never reach another. Topics are created with
``agentfabric topics apply`` and the worker is ``agentfabric worker``, both configured only by
``AGENTFABRIC_*`` variables, as a user would run them.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.kafka_io import Counter
from bench.procs import Child, Children, agentfabric_bin, run_cli
from streams.topics import TopicNames

__all__ = ["LLM", "NOOP1", "NOOP3", "Bench", "Fabric", "Workflow"]


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: tuple[str, ...]
    yaml: str


NOOP1 = Workflow("bench_noop1", ("only",), """
name: bench_noop1
version: 1
trigger: {source: bench, event_types: [ping]}
steps:
  - {id: only, kind: transform, output: {n: "{{ input.n }}"}}
""")

NOOP3 = Workflow("bench_noop3", ("one", "two", "three"), """
name: bench_noop3
version: 1
trigger: {source: bench, event_types: [ping]}
steps:
  - {id: one, kind: transform, output: {n: "{{ input.n }}"}}
  - {id: two, kind: transform, output: {n: "{{ steps.one.n }}"}}
  - {id: three, kind: transform, output: {n: "{{ steps.two.n }}"}}
""")

LLM = Workflow("bench_llm", ("think", "tidy"), """
name: bench_llm
version: 1
trigger: {source: bench, event_types: [ping]}
steps:
  - id: think
    kind: llm
    model: bench-model
    system: You answer in one word.
    prompt: "Say ok to number {{ input.n }}."
  - id: tidy
    kind: transform
    output: {n: "{{ input.n }}", answer: "{{ steps.think }}"}
""")


@dataclass
class Bench:
    """What every case shares: the embedded stack, a scratch folder, the child processes."""

    bootstrap: str
    redis_url: str
    tmp: Path
    children: Children
    counter: Counter
    fetch_max_wait_ms: int
    max_poll_records: int
    max_in_flight: int


class Fabric:
    """One case's workflow, topics and worker process."""

    def __init__(self, bench: Bench, prefix: str, workflow: Workflow, *, partitions: int,
                 extra_env: dict[str, str] | None = None) -> None:
        self.bench, self.prefix, self.workflow = bench, prefix, workflow
        self.names = TopicNames(prefix)
        self.dir = bench.tmp / prefix
        # the suite's own environment (so an AGENTFABRIC_MAX_IN_FLIGHT the suite reads is the
        # worker's too), with this case's connection, folders, prefix and partitions on top
        self.env = dict(os.environ)
        self.env.update({
            "AGENTFABRIC_BOOTSTRAP_SERVERS": bench.bootstrap,
            "AGENTFABRIC_REDIS_URL": bench.redis_url,
            "AGENTFABRIC_WORKFLOWS_DIR": str(self.dir / "workflows"),
            "AGENTFABRIC_TOPIC_PREFIX": prefix,
            "AGENTFABRIC_PARTITIONS": str(partitions),
            "AGENTFABRIC_STATE_DIR": str(self.dir / "state"),
            "AGENTFABRIC_VECTOR_DIR": str(self.dir / "vectors"),
            "AGENTFABRIC_SHUTDOWN_TIMEOUT_S": "20",
            **(extra_env or {}),
        })
        self.worker: Child | None = None
        self.worker_started_wall = 0.0

    @property
    def trigger_topic(self) -> str:
        return self.names.trigger("bench")

    @property
    def results_topic(self) -> str:
        return self.names.results(self.workflow.name)

    def step_topic(self, step: str) -> str:
        return self.names.step(self.workflow.name, step)

    async def prepare(self) -> None:
        """Write the workflow and create its topics with ``agentfabric topics apply``."""
        workflows = self.dir / "workflows"
        workflows.mkdir(parents=True, exist_ok=True)
        (workflows / f"{self.workflow.name}.yaml").write_text(self.workflow.yaml)
        await asyncio.to_thread(run_cli, ["topics", "apply"], self.env)

    def start_worker(self) -> Child:
        self.worker_started_wall = time.time()
        self.worker = self.bench.children.spawn(
            f"worker-{self.prefix}", [agentfabric_bin(), "worker", "--log-level", "WARNING"],
            env=self.env)
        return self.worker

    def alive(self) -> bool:
        return self.worker is not None and self.worker.popen.poll() is None

    async def stop_worker(self) -> str:
        """SIGTERM the worker by pid and wait for it; how it ended, in words."""
        if self.worker is None:
            return "not started"
        code = await self.bench.children.astop(self.worker, timeout_s=30.0)
        if self.worker.killed:
            return "did not stop within 30 s of SIGTERM; killed"
        return f"exit code {code}"

    async def dead_letters(self) -> int:
        return await self.bench.counter.count(self.names.dlq)
