"""Reading agentfabric topics as a non-agentfabric service would: confluent-kafka (librdkafka)
for Kafka, fastavro for Avro, and only the ``.avsc`` files in ``schemas/avro``.

Nothing here imports agentfabric (a test checks): the contract is the schema files, the
``af-schema`` header naming the writer's schema (``<name>.v<N>`` -> ``<name>.v<N>.avsc``),
and JSON-valued fields carried as JSON text (a run's ``output``, the values of ``context``).
"""

from __future__ import annotations

import json
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Consumer, KafkaError

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "avro"
SCHEMA_HEADER = "af-schema"
JSON_FIELDS = {"run_result": ("output",), "trigger_event": ("payload",),
               "step_message": ("input",)}
JSON_MAP_FIELDS = {"run_result": ("context",), "step_message": ("context",)}


@cache
def writer_schema(schema_id: str) -> Any:
    """The parsed schema ``<name>.v<N>`` from its ``.avsc`` file (each file is standalone)."""
    path = SCHEMA_DIR / f"{schema_id}.avsc"
    if path.parent != SCHEMA_DIR or not path.is_file():
        raise ValueError(f"no schema file for af-schema '{schema_id}' in {SCHEMA_DIR}")
    return fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")))


def decode_value(value: bytes, headers: list[tuple[str, bytes]] | None) -> dict[str, Any]:
    """One record's value as a dict: Avro with the writer's schema from the header, then the
    JSON-text fields parsed."""
    schema_id = dict(headers or [])[SCHEMA_HEADER].decode()
    from io import BytesIO

    buffer = BytesIO(value)
    record: dict[str, Any] = fastavro.schemaless_reader(buffer, writer_schema(schema_id))
    assert buffer.tell() == len(value), f"{len(value) - buffer.tell()} bytes left over"
    name = schema_id.rpartition(".v")[0]
    for field in JSON_FIELDS.get(name, ()):
        record[field] = json.loads(record[field])
    for field in JSON_MAP_FIELDS.get(name, ()):
        record[field] = {k: json.loads(v) for k, v in record[field].items()}
    record["_schema"] = schema_id
    return record


def read_records(bootstrap_servers: str, topic: str, count: int,
                 within_s: float = 30.0) -> list[dict[str, Any]]:
    """Read ``topic`` from the start with a consumer group of its own until ``count``
    records arrived (or ``within_s`` passed); each decoded with :func:`decode_value`."""
    consumer = Consumer({"bootstrap.servers": bootstrap_servers,
                         "group.id": f"interop-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "client.id": "interop-confluent",
                         # the embedded broker assigns a new group's member after half its
                         # session timeout: 3 s here, 22.5 s with librdkafka's default 45 s
                         "session.timeout.ms": 6000})
    found: list[dict[str, Any]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + within_s
        while len(found) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(f"consuming {topic}: {error}")
            value = message.value()
            assert value is not None
            record = decode_value(value, message.headers())
            record["_key"] = message.key()
            found.append(record)
    finally:
        consumer.close()
    return found
