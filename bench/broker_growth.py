"""The embedded broker alone: produce-ack latency as one partition grows, then on a fresh one.

    .venv/bin/python -m bench.broker_growth [--seconds 40] [--rate 200]

Starts the embedded broker and Redis on free ports, then, with a bare aiokafka producer and
consumer (no agentfabric code on the path), sends ``--rate`` messages/s to a new one-partition
topic for ``--seconds`` and prints the producer's send-to-acknowledgement p50/p99 per 4 s
window, and the broker's CPU share in each window. Then it does the same for 12 s on a second,
fresh topic. On Tansu's ``memory://`` engine a fetch lists every record batch of the
partition, so the figures grow with the first topic's length and start low again on the
fresh one (decision 0014).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
from aiokafka import AIOKafkaConsumer

from bench.kafka_io import producer
from streams.embedded import EmbeddedStack, free_port
from streams.topics import apply_topics

__all__ = ["main"]

WINDOW_S = 4.0


def _pct(values: list[float], q: float) -> float:
    ranked = sorted(values)
    return ranked[max(0, int(len(ranked) * q) - 1)] if ranked else float("nan")


async def _run(bootstrap: str, broker: psutil.Process, topic: str, seconds: float,
               rate: float) -> str:
    await apply_topics(bootstrap, [topic], partitions=1, replication_factor=1)
    prod = producer(bootstrap)
    cons = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                            auto_offset_reset="earliest", fetch_max_wait_ms=10)
    await prod.start()
    await cons.start()
    reader = asyncio.create_task(_drain(cons))
    acks: list[float | None] = []
    windows, per_window = [], int(rate * WINDOW_S)

    async def track(i: int, fut: asyncio.Future[object], sent: float) -> None:
        await fut
        acks[i] = (time.perf_counter() - sent) * 1000

    try:
        tasks = []
        cpu_before, begin = sum(broker.cpu_times()[:2]), time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            acks.append(None)
            sent = time.perf_counter()
            tasks.append(asyncio.create_task(track(i, await prod.send(topic, b"x" * 200), sent)))
            if (i + 1) % per_window == 0:
                cpu = sum(broker.cpu_times()[:2])
                windows.append(100 * (cpu - cpu_before) / WINDOW_S)
                cpu_before = cpu
        await asyncio.gather(*tasks)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await cons.stop()
        await prod.stop()
    out = []
    for n, start in enumerate(range(0, len(acks), per_window)):
        chunk = [a for a in acks[start:start + per_window] if a is not None]
        cpu = f", broker {windows[n]:.0f}% CPU" if n < len(windows) else ""
        out.append(f"{_pct(chunk, 0.5):.1f}/{_pct(chunk, 0.99):.1f} ms{cpu}")
    return f"{topic}: produce-ack p50/p99 per {WINDOW_S:.0f} s: " + " | ".join(out)


async def _drain(cons: AIOKafkaConsumer) -> None:
    while True:  # keeps the partition fetched, as a relay or worker would
        await cons.getmany(timeout_ms=1000)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--rate", type=float, default=200.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stack = EmbeddedStack(Path(tmp) / "stack", broker_port=free_port(),
                              redis_port=free_port())
        info = stack.start()
        try:
            broker = psutil.Process(info.broker.pid)
            print(asyncio.run(_run(info.bootstrap_servers, broker, "growth.long",
                                   args.seconds, args.rate)), flush=True)
            print(asyncio.run(_run(info.bootstrap_servers, broker, "growth.fresh", 12.0,
                                   args.rate)), flush=True)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
