"""Per-hop cost of the fabric against a raw aiokafka hop on the same embedded broker.

Both sides consume a message, produce one, wait for the ack and commit, in one run on
the same broker, so the figure to read is the ratio, not the absolute numbers (these
machines are noisy). The fabric side also decodes and encodes Avro, runs a one-step
transform workflow and makes its Redis idempotency round trips.

    .venv/bin/python bench/hop_latency.py [--messages 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agentfabric.app import build_engine, provision
from agentfabric.settings import Settings
from schemas.models import RunResult, TriggerEvent
from schemas.serde import decode
from streams.embedded import EmbeddedStack, free_port
from streams.kafka import Outgoing, Producer
from streams.runner import Worker
from streams.topics import TopicNames, apply_topics

WORKFLOW = """
name: echo
version: 1
trigger: {source: bench, event_types: [ping]}
steps:
  - {id: only, kind: transform, output: {n: "{{ input.n }}"}}
"""


async def raw_hop(settings: Settings, n: int) -> list[float]:
    """A consume -> produce -> ack -> commit relay written directly on aiokafka."""
    await apply_topics(settings.bootstrap_servers, ["raw.in", "raw.out"], partitions=1,
                       replication_factor=1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    relay = AIOKafkaConsumer("raw.in", bootstrap_servers=settings.bootstrap_servers,
                             group_id="raw-relay", enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=10)
    sink = AIOKafkaConsumer("raw.out", bootstrap_servers=settings.bootstrap_servers,
                            group_id="raw-sink", auto_offset_reset="earliest",
                            fetch_max_wait_ms=10)
    await asyncio.gather(producer.start(), relay.start(), sink.start())
    stop = asyncio.Event()

    async def relay_loop() -> None:
        while not stop.is_set():
            for records in (await relay.getmany(timeout_ms=100)).values():
                for r in records:
                    await producer.send_and_wait("raw.out", r.value, key=r.key)
                    await relay.commit()

    task = asyncio.create_task(relay_loop())
    latencies = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            await producer.send_and_wait("raw.in", str(i).encode(), key=b"k")
            while not (await sink.getmany(timeout_ms=1000)):
                pass
            latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        await task
        await asyncio.gather(producer.stop(), relay.stop(), sink.stop())
    return latencies


async def fabric_hop(settings: Settings, n: int) -> list[float]:
    engine = build_engine(settings)
    await provision(settings, engine)
    names = TopicNames(settings.topic_prefix)
    stop = asyncio.Event()
    worker = Worker(settings, engine)
    task = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.ready.wait(), 60)
    producer = Producer(settings)
    await producer.start()
    sink = AIOKafkaConsumer(names.results("echo"), bootstrap_servers=settings.bootstrap_servers,
                            group_id="fabric-sink", auto_offset_reset="earliest",
                            fetch_max_wait_ms=10)
    await sink.start()
    latencies = []
    try:
        for i in range(n):
            event = TriggerEvent(event_id=f"e{i}", source="bench", event_type="ping",
                                 payload={"n": i})
            t0 = time.perf_counter()
            await producer.send_all([Outgoing.of(names.trigger("bench"), event.event_id, event)])
            got = None
            while got is None:
                for records in (await sink.getmany(timeout_ms=1000)).values():
                    got = decode(records[-1].value, records[-1].headers, RunResult)
            latencies.append(time.perf_counter() - t0)
    finally:
        stop.set()
        await task
        await producer.stop()
        await sink.stop()
    return latencies


def summary(name: str, latencies: list[float]) -> float:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p95 = ordered[int(len(ordered) * 0.95) - 1] * 1000
    print(f"{name:28} n={len(ordered):5}  p50={p50:7.2f} ms  p95={p95:7.2f} ms")
    return p50


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workflows = Path(tmp) / "workflows"
        workflows.mkdir()
        (workflows / "echo.yaml").write_text(WORKFLOW)
        stack = EmbeddedStack(Path(tmp) / "stack", broker_port=free_port(),
                              redis_port=free_port())
        info = stack.start()
        try:
            settings = Settings(bootstrap_servers=info.bootstrap_servers,
                                redis_url=info.redis_url, workflows_dir=workflows,
                                partitions=1, topic_prefix="bench")
            raw = summary("raw aiokafka relay (1 hop)", await raw_hop(settings, n))
            fabric = summary("fabric: router + 1 step", await fabric_hop(settings, n))
            print(f"ratio fabric/raw p50: {fabric / raw:.2f} (the fabric path is two hops: "
                  f"trigger -> step -> result)")
        finally:
            stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    asyncio.run(main(parser.parse_args().messages))
