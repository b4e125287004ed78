"""The router and step executors through the runtime's stages (decode, dedupe, execute, route)
with the in-memory store: decoding, dead letters, emit-once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from agentfabric.executors import RouterExecutor, StepExecutor
from agentfabric.settings import Settings
from agents.engine import Engine
from agents.loader import load_workflows
from schemas.models import DeadLetter, RunEvent, RunResult, StepMessage, TriggerEvent
from schemas.serde import decode, encode
from streams.executor import Executor
from streams.idempotency import MemoryEmissionStore
from streams.kafka import Outgoing
from streams.stages import Dedupe, Pipeline, execute, route
from streams.stages import decode as decode_stage
from streams.topics import TopicNames
from tests.faketools import sample_tools

NAMES = TopicNames("af")


@dataclass
class Handled:
    messages: list[Outgoing]
    ack_key: str | None


class Handler:
    """The inner stages of the runtime: what a record makes, before it is sent."""

    def __init__(self, executor: Executor, store: MemoryEmissionStore) -> None:
        self.pipeline = Pipeline(executor, [decode_stage, Dedupe(store), execute, route])

    async def handle(self, rec: ConsumerRecord[bytes, bytes]) -> Handled:
        work = await self.pipeline.run(rec)
        return Handled(work.outputs, work.ack_key)


def router_of(engine: Engine, store: MemoryEmissionStore) -> Handler:
    return Handler(RouterExecutor(engine, NAMES, Settings()), store)


def step_handler(engine: Engine, store: MemoryEmissionStore, workflow: str, step: str,
                 max_attempts: int) -> Handler:
    executor = StepExecutor(engine, NAMES, Settings(max_attempts=max_attempts), workflow, step)
    return Handler(executor, store)


def record(topic: str, value: bytes | None, headers: list[tuple[str, bytes]] | None = None,
           key: bytes | None = b"k", offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=topic, partition=0, offset=offset, timestamp=0,
                          timestamp_type=0, key=key, value=value, checksum=None,
                          serialized_key_size=1, serialized_value_size=1,
                          headers=tuple(headers or ()))


@pytest.fixture
def engine(rules_workflows: Path) -> Engine:
    return Engine(load_workflows(rules_workflows), sample_tools())


@pytest.fixture
def store() -> MemoryEmissionStore:
    return MemoryEmissionStore()


def lead_json(**extra: Any) -> bytes:
    return json.dumps({"event_type": "lead.created", "event_id": "e1",
                       "payload": {"lead_id": "L1", "email": "a@contoso.com"}, **extra}).encode()


def only_dead_letter(messages: list[Outgoing]) -> DeadLetter:
    """The one dead letter among ``messages`` (beside it at most the ledger's event)."""
    letters = without_run_events(messages)
    assert [m.topic for m in letters] == ["af.dlq"]
    return decode(letters[0].value, letters[0].headers, DeadLetter)


async def test_router_accepts_plain_json_from_foreign_producers(
        engine: Engine, store: MemoryEmissionStore) -> None:
    router = router_of(engine, store)
    handled = await router.handle(record("af.triggers.crm", lead_json()))
    [out] = handled.messages
    assert out.topic == "af.lead_enrichment.normalise"
    message = decode(out.value, out.headers, StepMessage)
    assert message.input["email"] == "a@contoso.com"
    assert message.source == "crm"
    assert dict(out.headers)["traceparent"] == message.trace_parent.encode()


async def test_router_accepts_avro_and_keeps_incoming_trace(
        engine: Engine, store: MemoryEmissionStore) -> None:
    value, headers = encode(TriggerEvent(source="crm", event_type="lead.created",
                                         payload={"email": "a@b.co"}))
    trace = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    handled = await router_of(engine, store).handle(
        record("af.triggers.crm", value, [*headers, ("traceparent", trace.encode())]))
    message = decode(handled.messages[0].value, handled.messages[0].headers, StepMessage)
    assert message.trace_parent is not None
    assert message.trace_parent.split("-")[1] == "1" * 32


@pytest.mark.parametrize(("value", "error", "fragment"), [
    (b"\x00garbage", "DecodeError", "the value is neither an agentfabric message nor JSON"),
    (b"[1, 2]", "MessageValidationError", "the event is a JSON list, not an object"),
    (json.dumps({"event_type": "lead.created"}).encode(), "MessageValidationError",
     "payload: Field required"),
    (lead_json(source="erp"), "MessageValidationError",
     "the event says source 'erp' but arrived on the trigger topic of 'crm'"),
    (lead_json(event_type="lead.deleted"), "UnroutableEventError",
     "no workflow starts on event type 'lead.deleted'"),
    (lead_json(workflow="ghost"), "UnknownWorkflowError", "workflow 'ghost' is not loaded"),
])
async def test_router_dead_letters_bad_events(engine: Engine, store: MemoryEmissionStore,
                                              value: bytes, error: str, fragment: str) -> None:
    handled = await router_of(engine, store).handle(
        record("af.triggers.crm", value, [("authorization", b"Bearer s3cret")]))
    letter = only_dead_letter(handled.messages)
    assert letter.error_type == error
    assert fragment in letter.reason
    assert letter.value == value
    assert letter.consumer_group == "af.router"
    assert letter.headers[0].value == b"[redacted]", "secrets never reach a dead letter"


async def test_redelivery_after_ack_emits_nothing(engine: Engine,
                                                  store: MemoryEmissionStore) -> None:
    router = router_of(engine, store)
    first = await router.handle(record("af.triggers.crm", lead_json()))
    assert first.ack_key is not None
    await store.acknowledge(first.ack_key)
    again = await router.handle(record("af.triggers.crm", lead_json(), offset=1))
    assert again.messages == []


async def test_redelivery_before_ack_re_emits_the_same_bytes(
        engine: Engine, store: MemoryEmissionStore) -> None:
    router = router_of(engine, store)
    first = await router.handle(record("af.triggers.crm", lead_json()))
    again = await router.handle(record("af.triggers.crm", lead_json()))
    assert again.messages == first.messages


async def walk(engine: Engine, store: MemoryEmissionStore, value: bytes) -> list[Outgoing]:
    """Route one event and run its steps until a result or a dead letter."""
    messages = (await router_of(engine, store).handle(
        record("af.triggers.erp", value))).messages
    while messages and not messages[0].topic.startswith(("af.results.", "af.dlq")):
        out = messages[0]
        workflow, step = out.topic.split(".")[1:]
        handler = step_handler(engine, store, workflow, step, 3)
        messages = without_run_events(
            (await handler.handle(record(out.topic, out.value, list(out.headers)))).messages)
    return messages


def without_run_events(messages: list[Outgoing]) -> list[Outgoing]:
    """A step's outputs less the run ledger's event (one per processed step)."""
    return [m for m in messages if not m.topic.endswith(".run-events")]


async def test_step_handlers_carry_a_run_to_its_result(engine: Engine,
                                                       store: MemoryEmissionStore) -> None:
    value = json.dumps({"event_type": "invoice.posted", "payload": {
        "invoice_id": "I1", "vendor_id": "V-1001", "amount": 100, "currency": "USD",
        "invoice_date": "2026-11-01", "due_date": "2026-12-01"}}).encode()
    [out] = await walk(engine, store, value)
    assert out.topic == "af.results.invoice_triage"
    result = decode(out.value, out.headers, RunResult)
    assert result.output["queue"] == "auto-pay"


async def test_step_failure_dead_letter_names_the_run(engine: Engine,
                                                      store: MemoryEmissionStore) -> None:
    value = json.dumps({"event_type": "invoice.posted", "payload": {
        "invoice_id": "I1", "vendor_id": "V-1001", "amount": "lots", "currency": "USD",
        "invoice_date": "2026-11-01", "due_date": "2026-12-01"}}).encode()
    letter = only_dead_letter(await walk(engine, store, value))
    assert letter.error_type == "ToolError"
    assert letter.workflow == "invoice_triage"
    assert letter.step == "validate"
    assert letter.run_id is not None


async def test_transient_step_failure_retries_then_dead_letters(
        engine: Engine, store: MemoryEmissionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentfabric.errors import TransientError

    async def unavailable(*_: Any, **__: Any) -> Any:
        raise TransientError("the CRM is unavailable")

    monkeypatch.setattr(engine.tools, "call", unavailable)
    [first] = (await router_of(engine, store).handle(
        record("af.triggers.crm", lead_json()))).messages
    normalise = step_handler(engine, store, "lead_enrichment", "normalise", 2)
    [to_enrich] = without_run_events((await normalise.handle(
        record(first.topic, first.value, list(first.headers)))).messages)
    enrich = step_handler(engine, store, "lead_enrichment", "enrich", 2)
    retry, note = (await enrich.handle(record(to_enrich.topic, to_enrich.value,
                                              list(to_enrich.headers)))).messages
    # beside the retry, the ledger's event of the failed attempt
    failed = decode(note.value, note.headers, RunEvent)
    assert (failed.outcome, failed.attempt, failed.step) == ("retry", 1, "enrich")
    assert failed.error == "TransientError: the CRM is unavailable"
    assert retry.topic == "af.retry.lead_enrichment.enrich.1s", "waits on the first tier"
    assert decode(retry.value, retry.headers, StepMessage).attempt == 2
    headers = dict(retry.headers)
    assert int(headers["af-retry-due"]) - int(headers["af-first-failure"]) == 1000
    # the retry consumer puts it back on the step's topic when it is due
    handled = await enrich.handle(record(to_enrich.topic, retry.value, list(retry.headers)))
    letter = only_dead_letter(handled.messages)
    assert letter.reason == ("the CRM is unavailable (gave up after 2 attempts; replay the "
                             "dead letter once the cause is fixed)")
    assert letter.attempts == 2


async def test_a_dead_lettered_event_is_remembered_and_a_replay_runs_it_once(
        engine: Engine, store: MemoryEmissionStore) -> None:
    router = router_of(engine, store)
    event = lead_json(workflow="ghost")
    first = await router.handle(record("af.triggers.crm", event))
    assert first.ack_key is not None, "a dead-lettered outcome is remembered"
    only_dead_letter(first.messages)
    await store.acknowledge(first.ack_key)
    # a redelivery of the same record runs nothing again
    again = await router.handle(record("af.triggers.crm", event, offset=5))
    assert again.messages == []
    # a replay of the dead letter (after the cause is fixed) is handled afresh, once
    replayed = record("af.triggers.crm", event, [("af-replay-of", b"dl-1")], offset=9)
    fresh = await router.handle(replayed)
    assert only_dead_letter(fresh.messages).offset == 9
    assert fresh.ack_key is not None
    await store.acknowledge(fresh.ack_key)
    assert (await router.handle(replayed)).messages == [], "the same replay runs once"


async def test_a_replay_of_a_completed_step_runs_nothing(engine: Engine,
                                                         store: MemoryEmissionStore) -> None:
    [first] = (await router_of(engine, store).handle(
        record("af.triggers.crm", lead_json()))).messages
    normalise = step_handler(engine, store, "lead_enrichment", "normalise", 3)
    done = await normalise.handle(record(first.topic, first.value, list(first.headers)))
    assert done.messages
    replay = await normalise.handle(record(first.topic, first.value,
                                           [*first.headers, ("af-replay-of", b"dl-2")]))
    assert replay.messages == [], "the step visit completed: its replay runs nothing"


def test_secrets_in_error_messages_never_reach_a_dead_letter() -> None:
    from streams.dlq import dead_letter

    error = RuntimeError("POST https://bot:hunter2@crm.example/api?api_key=sk-123 failed: "
                         "Authorization: Bearer eyJabc.def")
    out = dead_letter(record("af.triggers.crm", b"{}"), error, group="g", dlq_topic="af.dlq")
    letter = decode(out.value, out.headers, DeadLetter)
    for secret in ("hunter2", "sk-123", "eyJabc"):
        assert secret not in letter.reason
    assert "https://[redacted]@crm.example" in letter.reason


async def test_routing_and_pure_steps_are_pure_jobs_and_tool_steps_are_not(
        engine: Engine) -> None:
    router = RouterExecutor(engine, NAMES, Settings())
    trigger = router.decode(record("af.triggers.crm", lead_json()))
    assert trigger.pure, "routing a trigger has no effect beyond its output"
    [first] = engine.start(TriggerEvent(source="crm", event_type="lead.created",
                                        payload={"lead_id": "L1", "email": "a@contoso.com"}))
    assert first.step == "normalise"
    value, headers = encode(first)
    normalise = StepExecutor(engine, NAMES, Settings(), "lead_enrichment", "normalise")
    assert normalise.decode(record("af.lead_enrichment.normalise", value, headers)).pure
    enrich = first.model_copy(update={"step": "enrich"})
    value, headers = encode(enrich)
    tool = StepExecutor(engine, NAMES, Settings(), "lead_enrichment", "enrich")
    assert not tool.decode(record("af.lead_enrichment.enrich", value, headers)).pure
