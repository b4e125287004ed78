"""The raw baseline: a consume -> produce relay written directly on aiokafka, in its own process.

It is written the way a careful hand-written relay would be: ``getmany`` a batch, produce every
record of it without waiting for each acknowledgement, await all the acknowledgements, then
commit the batch's offsets. The producer and consumer use the fabric's own client settings
(``acks=all``, no idempotence, ``linger_ms=0``, the same fetch wait and poll size), so the
only difference from a fabric hop is the fabric's own work. SIGTERM stops it.

    python -m bench.relay BOOTSTRAP SOURCE_TOPIC DEST_TOPIC GROUP [--fetch-max-wait-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

READY = "relay ready"


def clients(bootstrap: str, source: str, group: str, *, fetch_max_wait_ms: int,
            max_poll_records: int) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """A hop's consumer of ``source`` and producer, with the fabric's client settings."""
    consumer = AIOKafkaConsumer(
        source, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=fetch_max_wait_ms,
        max_poll_records=max_poll_records)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                enable_idempotence=False, linger_ms=0)
    return consumer, producer


async def relay(bootstrap: str, source: str, dest: str, group: str, *, fetch_max_wait_ms: int,
                max_poll_records: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumer, producer = clients(bootstrap, source, group, fetch_max_wait_ms=fetch_max_wait_ms,
                                 max_poll_records=max_poll_records)
    await producer.start()
    await consumer.start()
    relayed = 0
    announced = False
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            if not announced and consumer.assignment():
                print(READY, flush=True)
                announced = True
            if not batches:
                continue
            acks: list[asyncio.Future[Any]] = []
            commit: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in batches.items():
                for record in records:
                    acks.append(await producer.send(dest, record.value, key=record.key,
                                                    headers=list(record.headers)))
                commit[tp] = OffsetAndMetadata(records[-1].offset + 1, "")
            await asyncio.gather(*acks)
            await consumer.commit(commit)
            relayed += len(acks)
    finally:
        await consumer.stop()
        await producer.stop()
    print(f"relay stopped: relayed {relayed} messages", flush=True)
    return relayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap")
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("group")
    parser.add_argument("--fetch-max-wait-ms", type=int, default=10)
    parser.add_argument("--max-poll-records", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(relay(args.bootstrap, args.source, args.dest, args.group,
                      fetch_max_wait_ms=args.fetch_max_wait_ms,
                      max_poll_records=args.max_poll_records))


if __name__ == "__main__":
    main()
