"""The fuzz plan: bad records of many kinds (seeded), good step messages and good foreign
JSON events, and how to send a record whose header key is not UTF-8."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.record.util import calc_crc32c

from agentfabric.app import build_engine
from agentfabric.settings import Settings
from schemas.models import StepMessage, TriggerEvent
from schemas.serde import SCHEMA_HEADER, encode
from streams.topics import TopicNames, apply_topics
from tests.integration.helpers import Case, cases, invoice_case

__all__ = ["DEEP", "Bad", "Plan", "largest_value", "make_plan", "send_bad"]

DEEP = 100_000


@dataclass
class Bad:
    """One bad record and what its dead letter must say."""

    label: str
    kind: str
    topic: str
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()
    bad_header_key: bool = False
    dead_key: str = ""  # the key its dead letter carries (default: the label)
    error: str | None = None  # the error type its dead letter must have, if determinate
    says: str | None = None  # a phrase its reason must contain


@dataclass
class Plan:
    bad: list[Bad] = field(default_factory=list)
    good_steps: list[tuple[Case, StepMessage]] = field(default_factory=list)
    good_foreign: list[tuple[str, bytes, Case]] = field(default_factory=list)  # topic, json


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] * 2 if depth < 4
                                                       else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-(2**63), 2**63)
    if kind == "float":
        return rng.uniform(-1e300, 1e300)
    if kind == "str":
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)]))
                       for _ in range(rng.randint(0, 30)))
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(1, 9)))
            for _ in range(rng.randint(0, 6))]
    return {k: random_json(rng, depth + 1) for k in keys if k != "event_type"}


def deep_list() -> bytes:
    return b"[" * DEEP + b"]" * DEEP


def deep_object(inner: bytes = b"1") -> bytes:
    return b'{"a":' * DEEP + inner + b"}" * DEEP


def nested(levels: int) -> Any:
    value: Any = "V-1001"
    for _ in range(levels):
        value = [value]
    return value


async def largest_value(settings: Settings, topic: str) -> tuple[int, bool]:
    """The largest value a producer with the default max_request_size writes (by trying),
    and whether the broker itself took a record four times that size."""
    await apply_topics(settings.bootstrap_servers, [topic], partitions=1,
                       replication_factor=1)
    default = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0)
    roomy = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=0,
                             max_request_size=16 * 1024 * 1024)
    await default.start()
    await roomy.start()
    try:
        low, high = 1024, 2 * 1024 * 1024  # fits / does not fit
        while high - low > 1:
            middle = (low + high) // 2
            try:
                await default.send_and_wait(topic, b"x" * middle, key=b"bad-00000",
                                            headers=[(SCHEMA_HEADER, b"step_message.v4")])
                low = middle
            except KafkaError:
                high = middle
        try:
            await roomy.send_and_wait(topic, b"x" * (4 * low), key=b"probe")
            broker_takes_more = True
        except KafkaError:
            broker_takes_more = False
        return low, broker_takes_more
    finally:
        await default.stop()
        await roomy.stop()


def step_message(engine: Any, event: TriggerEvent) -> StepMessage:
    [message] = engine.start(event)
    assert isinstance(message, StepMessage)
    return message


def make_plan(settings: Settings, seed: int, limit: int) -> Plan:
    """The bad and good records of one fuzz run, from ``seed``."""
    rng = random.Random(seed)
    names = TopicNames(settings.topic_prefix)
    engine = build_engine(settings)
    plan = Plan()
    triggers = [names.trigger("crm"), names.trigger("erp")]
    steps = [names.step("invoice_triage", "vendor"), names.step("invoice_triage", "validate"),
             names.step("lead_enrichment", "normalise"), names.step("lead_enrichment", "route")]
    retry = names.retry("invoice_triage", "vendor", settings.retry_tiers_s[0])
    count = 0

    def add(kind: str, topic: str, value: bytes | None, headers: Sequence[tuple[str, bytes]]
            = (), **kw: Any) -> None:
        nonlocal count
        count += 1
        plan.bad.append(Bad(f"bad-{count:05d}", kind, topic, value, headers, **kw))

    def valid_step(i: int) -> StepMessage:
        case = invoice_case(90_000 + i, rng)
        event = case.event.model_copy(update={"event_id": f"wrongv-{i}"})
        return step_message(engine, event)

    step_v4 = (SCHEMA_HEADER, b"step_message.v4")
    for topic in triggers:
        for _ in range(20):
            add("random bytes", topic, rng.randbytes(rng.randint(0, 3000)))
        for _ in range(8):
            add("random bytes, Avro header", topic, rng.randbytes(rng.randint(1, 3000)),
                [(SCHEMA_HEADER, b"trigger_event.v1")], error="DecodeError")
        for _ in range(25):
            add("random JSON", topic, json.dumps(random_json(rng)).encode())
        add("deep JSON (list)", topic, deep_list(), error="DecodeError")
        add("deep JSON (object)", topic, deep_object(), error="DecodeError")
        add("deep JSON payload", topic,
            b'{"event_type": "invoice.posted", "payload": ' + deep_object() + b"}",
            error="DecodeError")
        add("tombstone", topic, None)
        add("near the limit, random bytes", topic, rng.randbytes(limit - rng.randint(0, 64)))
        add("near the limit, JSON without event_type", topic,
            json.dumps({"junk": "x" * (limit - 1100 + rng.randint(0, 1024))}).encode(),
            error="MessageValidationError")
        add("header key not UTF-8", topic, json.dumps(
            {"event_type": "lead.created", "payload": {"lead_id": "L-X"}}).encode(),
            bad_header_key=True, error="DecodeError", says="is not UTF-8")
        add("unknown schema version", topic, rng.randbytes(50),
            [(SCHEMA_HEADER, b"trigger_event.v7")], error="DecodeError", says="not known")
        add("another message's schema", topic, encode(valid_step(count))[0], [step_v4],
            error="DecodeError")
        event = TriggerEvent(event_id=f"trail-{count}", source=topic.rsplit(".", 1)[1],
                             event_type="lead.created", payload={"lead_id": "L-T"})
        value, headers = encode(event)
        add("trailing bytes", topic, value + b"\x00\x02", headers, error="DecodeError",
            says="longer than")
        add("event nobody takes", topic, json.dumps(
            {"event_type": "nothing.happened", "payload": {}}).encode(),
            error="UnroutableEventError")
    # a payload nested deeper than expressions read: the run starts, its first step's tool
    # rejects the argument; the dead letter carries the run id
    deep_event = TriggerEvent(event_id="deep-ok-1", source="erp", event_type="invoice.posted",
                              tenant="acme",
                              payload={"invoice_id": "INV-DEEP", "vendor_id": nested(150),
                                       "amount": 1, "currency": "USD",
                                       "invoice_date": "2026-11-01",
                                       "due_date": "2026-12-01"})
    deep_run = step_message(engine, deep_event).run_id
    add("nested 150 levels (parseable)", names.trigger("erp"),
        deep_event.model_dump_json().encode(), dead_key=deep_run, error="ToolArgumentsError")

    for topic in steps:
        for _ in range(8):
            add("random bytes", topic, rng.randbytes(rng.randint(0, 3000)),
                error="DecodeError")
            add("random bytes, Avro header", topic, rng.randbytes(rng.randint(1, 3000)),
                [step_v4])
            add("random JSON", topic, json.dumps(random_json(rng)).encode(),
                error="DecodeError")
        add("deep JSON (list)", topic, deep_list(), [step_v4], error="DecodeError")
        add("tombstone", topic, None, [step_v4], error="DecodeError")
        add("near the limit, Avro header", topic,
            rng.randbytes(limit - rng.choice([0, rng.randint(0, 1024)])), [step_v4],
            error="DecodeError")
        good_body, good_headers = encode(valid_step(count))
        add("header key not UTF-8", topic, good_body, good_headers, bad_header_key=True,
            error="DecodeError", says="is not UTF-8")
        for wrong in (b"step_message.v2", b"step_message.v1"):
            add(f"v4 body labelled {wrong.decode()}", topic, encode(valid_step(count))[0],
                [(SCHEMA_HEADER, wrong)], error="DecodeError")
        add("unknown schema version", topic, encode(valid_step(count))[0],
            [(SCHEMA_HEADER, b"step_message.v99")], error="DecodeError", says="not known")
        add("version not a number", topic, encode(valid_step(count))[0],
            [(SCHEMA_HEADER, b"step_message.vX")], error="DecodeError")
        add("trailing bytes", topic, encode(valid_step(count))[0] + rng.randbytes(3),
            [step_v4], error="DecodeError", says="longer than")
        add("another message's schema", topic, encode(valid_step(count))[0],
            [(SCHEMA_HEADER, b"run_result.v2")], error="DecodeError")
    vendor = steps[0]
    unknown = valid_step(count).model_copy(update={"workflow": "no_such_workflow"})
    add("unknown workflow", vendor, *encode(unknown), error="UnknownWorkflowError")
    unknown = valid_step(count).model_copy(update={"step": "no_such_step"})
    add("unknown step", vendor, *encode(unknown), error="UnknownStepError")
    for _ in range(3):
        add("random bytes", retry, rng.randbytes(rng.randint(0, 500)), error="DecodeError")
    add("v4 body labelled step_message.v2", retry, encode(valid_step(count))[0],
        [(SCHEMA_HEADER, b"step_message.v2")], error="DecodeError")

    # good step messages written straight to the step topics
    for case in cases(40, seed=seed + 1, first_id=50_000):
        plan.good_steps.append((case, step_message(engine, case.event)))
    # good plain JSON events from a foreign producer (no headers), one near the limit
    for case in cases(20, seed=seed + 2, first_id=60_000):
        body = case.event.model_dump(mode="json", exclude={"source"})
        plan.good_foreign.append((names.trigger(case.event.source),
                                  json.dumps(body).encode(), case))
    big = invoice_case(70_000, random.Random(seed + 3))
    payload = {**big.event.payload, "notes": ""}
    body = {"event_type": "invoice.posted", "event_id": big.event.event_id,
            "tenant": "acme", "payload": payload}
    pad = limit - rng.randint(0, 1024) - len(json.dumps(body).encode())
    payload["notes"] = "n" * pad
    plan.good_foreign.append((names.trigger("erp"), json.dumps(body).encode(), big))
    rng.shuffle(plan.bad)
    return plan


async def send_bad(producer: AIOKafkaProducer, bad: Bad) -> None:
    key = bad.label.encode()
    if not bad.bad_header_key:
        await producer.send_and_wait(bad.topic, bad.value, key=key, headers=list(bad.headers))
        return
    # a header key that is not UTF-8: a hand-built batch with a placeholder key replaced
    # and the CRC recomputed (as tests/integration/rawkafka.py does, with more headers)
    placeholder, invalid = "AFBADKEY", b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"
    batch = producer.create_batch()
    batch.append(timestamp=None, key=key, value=bad.value,
                 headers=[(placeholder, b"x"), *bad.headers])
    raw = bytearray(batch._build())
    at = raw.find(placeholder.encode())
    raw[at:at + len(invalid)] = invalid
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))
    batch._buffer = bytes(raw)
    await (await producer.send_batch(batch, bad.topic, partition=0))


