"""The floor of (b): the no-op one-step workflow's two hops with only the work no design can
skip, in its own process, written like the raw relay.

Hop 1 reads a trigger event (Avro), asks the workflow engine for the run's first step
message, encodes it (Avro) and produces it; hop 2 reads that message, runs the step with the
engine and produces the encoded result. Both hops run in one process and one event loop, as
a worker runs the router and a step, each batch produced without waiting per message and
committed after its acknowledgements. What it leaves out is everything the fabric adds for
delivery and operations: the emission store and leases in Redis, the run ledger's events,
claim checks, metrics, log context, per-record timeouts and the in-flight window. So
(b0)/(a) bounds what (b)/(a) can reach on this machine with Avro envelopes and this
engine. SIGTERM stops it.

    python -m bench.floor BOOTSTRAP TRIGGER_TOPIC STEP_TOPIC RESULTS_TOPIC GROUP
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from agentfabric.app import build_engine
from agentfabric.settings import load_settings
from bench.relay import clients
from schemas.models import StepMessage, TriggerEvent
from schemas.serde import decode, encode

Out = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]


async def _hop(bootstrap: str, source: str, dest: str, group: str,
               work: Callable[[ConsumerRecord], Awaitable[Out]], stop: asyncio.Event, *,
               fetch_max_wait_ms: int, max_poll_records: int) -> int:
    consumer, producer = clients(bootstrap, source, group, fetch_max_wait_ms=fetch_max_wait_ms,
                                 max_poll_records=max_poll_records)
    await producer.start()
    await consumer.start()
    moved = 0
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            acks: list[asyncio.Future[Any]] = []
            commit: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in batches.items():
                for record in records:
                    for key, value, headers in await work(record):
                        acks.append(await producer.send(dest, value, key=key, headers=headers))
                commit[tp] = OffsetAndMetadata(records[-1].offset + 1, "")
            if acks:
                await asyncio.gather(*acks)
            if commit:
                await consumer.commit(commit)
            moved += len(acks)
    finally:
        await consumer.stop()
        await producer.stop()
    return moved


async def floor(bootstrap: str, trigger_topic: str, step_topic: str, results_topic: str,
                group: str, *, fetch_max_wait_ms: int, max_poll_records: int) -> None:
    engine = build_engine(load_settings())  # AGENTFABRIC_* variables: the case's workflows
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def route(record: ConsumerRecord) -> Out:
        event = decode(record.value, record.headers, TriggerEvent)
        out: Out = []
        for message in engine.start(event):
            value, headers = encode(message)
            out.append((message.run_id.encode(), value, list(headers)))
        return out

    async def step(record: ConsumerRecord) -> Out:
        message = decode(record.value, record.headers, StepMessage)
        out: Out = []
        for emitted in (await engine.run_step(message)).emitted:
            value, headers = encode(emitted)
            out.append((message.run_id.encode(), value, list(headers)))
        return out

    options = {"fetch_max_wait_ms": fetch_max_wait_ms, "max_poll_records": max_poll_records}
    moved = await asyncio.gather(
        _hop(bootstrap, trigger_topic, step_topic, f"{group}-route", route, stop, **options),
        _hop(bootstrap, step_topic, results_topic, f"{group}-step", step, stop, **options))
    print(f"floor stopped: {moved[1]} results", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    for name in ("bootstrap", "trigger_topic", "step_topic", "results_topic", "group"):
        parser.add_argument(name)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=10)
    parser.add_argument("--max-poll-records", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(floor(args.bootstrap, args.trigger_topic, args.step_topic, args.results_topic,
                      args.group, fetch_max_wait_ms=args.fetch_max_wait_ms,
                      max_poll_records=args.max_poll_records))


if __name__ == "__main__":
    main()
