"""What a consumer does with one record: the router (trigger -> first steps) and the step
handler (run one step -> next step or result). Both are idempotent through the
emission store and turn permanent failures into dead letters; infrastructure failures
(Redis, Kafka) propagate as UnavailableError for the runtime to rewind and retry the record.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from agentfabric.errors import (
    AgentFabricError,
    DecodeError,
    MessageValidationError,
    PermanentError,
    TransientError,
    UnavailableError,
)
from agents.engine import Engine, root_run_id
from schemas.models import HandOff, RunResult, StepMessage, TriggerEvent
from schemas.serde import SCHEMA_HEADER, decode, header_value, validation_reason

from .dlq import dead_letter
from .idempotency import EmissionStore
from .kafka import Outgoing
from .topics import TopicNames

__all__ = ["Handled", "Handler", "RouterHandler", "StepHandler", "decode_trigger"]

TRACE_HEADER = "traceparent"


@dataclass
class Handled:
    """Messages to produce for a record, and the store key to acknowledge once they are."""

    messages: list[Outgoing] = field(default_factory=list)
    ack_key: str | None = None


class Handler:
    """Base of the record handlers: topic subscription, group, and emit-once logic."""

    name: str
    group: str
    topics: list[str]

    def __init__(self, engine: Engine, names: TopicNames, store: EmissionStore) -> None:
        self.engine = engine
        self.names = names
        self.store = store

    async def handle(self, record: ConsumerRecord) -> Handled:
        raise NotImplementedError

    async def _once(self, key: str, compute: Callable[[], Awaitable[list[Outgoing]]]) -> Handled:
        stored, acked = await self.store.recall(key)
        if acked:
            return Handled()
        if stored is None:
            stored = await compute()
            if stored and all(m.topic == self.names.dlq for m in stored):
                # not remembered: replaying the dead letter after a fix must run it again
                return Handled(stored)
            await self.store.remember(key, stored)
        return Handled(stored, key)

    def _dead(self, record: ConsumerRecord, error: Exception,
              message: StepMessage | None = None) -> list[Outgoing]:
        return [dead_letter(record, error, group=self.group, dlq_topic=self.names.dlq,
                            message=message)]


def decode_trigger(record: ConsumerRecord, source: str) -> TriggerEvent:
    """An agentfabric (Avro) trigger, or a plain JSON event from any other producer."""
    if header_value(record.headers, SCHEMA_HEADER) is not None:
        event = decode(record.value, record.headers, TriggerEvent)
    else:
        try:
            data = json.loads(record.value or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"the value is neither an agentfabric message nor JSON ({exc}); "
                              f"send a JSON object with event_type and payload") from exc
        if not isinstance(data, dict):
            raise MessageValidationError(f"the event is a JSON {type(data).__name__}, not an "
                                         f"object; send an object with event_type and payload")
        data.setdefault("source", source)
        try:
            event = TriggerEvent.model_validate(data)
        except ValidationError as exc:
            raise MessageValidationError(f"the event does not fit the TriggerEvent schema: "
                                         f"{validation_reason(exc)}") from exc
    if event.source != source:
        raise MessageValidationError(f"the event says source '{event.source}' but arrived on "
                                     f"the trigger topic of '{source}'; publish it to that "
                                     f"source's topic")
    return event


def _trace_header(message: StepMessage) -> list[tuple[str, bytes]]:
    return [(TRACE_HEADER, message.trace_parent.encode())] if message.trace_parent else []


class RouterHandler(Handler):
    """Reads every trigger topic; starts the runs of each workflow an event triggers."""

    def __init__(self, engine: Engine, names: TopicNames, store: EmissionStore) -> None:
        super().__init__(engine, names, store)
        self.name = "router"
        self.group = names.router_group
        self.topics = [names.trigger(s) for s in engine.workflows.sources()]

    async def handle(self, record: ConsumerRecord) -> Handled:
        source = self.names.source_of(record.topic) or ""
        try:
            event = decode_trigger(record, source)
        except PermanentError as exc:
            return Handled(self._dead(record, exc))
        incoming = header_value(record.headers, TRACE_HEADER)

        async def compute() -> list[Outgoing]:
            try:
                trace = incoming.decode("utf-8", "replace") if incoming else None
                starts = self.engine.start(event, trace)
            except PermanentError as exc:
                return self._dead(record, exc)
            return [Outgoing.of(self.names.step(m.workflow, m.step), m.run_id, m,
                                _trace_header(m)) for m in starts]

        return await self._once(f"trigger:{event.tenant}:{event.source}:{event.event_id}",
                                compute)


class StepHandler(Handler):
    """Runs one step of one workflow; transient step failures retry, then dead-letter."""

    def __init__(self, engine: Engine, names: TopicNames, store: EmissionStore, workflow: str,
                 step: str, max_attempts: int) -> None:
        super().__init__(engine, names, store)
        self.name = f"{workflow}.{step}"
        self.group = names.step_group(workflow, step)
        self.topics = [names.step(workflow, step)]
        self.max_attempts = max_attempts

    async def handle(self, record: ConsumerRecord) -> Handled:
        try:
            message = decode(record.value, record.headers, StepMessage)
        except PermanentError as exc:
            return Handled(self._dead(record, exc))

        async def compute() -> list[Outgoing]:
            try:
                run = await self.engine.run_step(message)
            except UnavailableError:
                raise  # Kafka/Redis down: the runtime rewinds; not a step attempt
            except TransientError as exc:
                if message.attempt >= self.max_attempts:
                    exhausted = TransientError(
                        f"{exc.reason} (gave up after {message.attempt} attempts; replay the "
                        f"dead letter once the cause is fixed)")
                    return self._dead(record, exhausted, message)
                retry = message.model_copy(update={"attempt": message.attempt + 1})
                return [Outgoing.of(record.topic, message.run_id, retry, _trace_header(retry))]
            except AgentFabricError as exc:
                return self._dead(record, exc, message)
            except Exception as exc:  # noqa: BLE001 - a step's bug becomes a dead letter
                return self._dead(record, exc, message)
            out = [self._route(emitted) for emitted in run.emitted]
            if run.recording is not None:
                out.append(Outgoing.of(self.names.recordings, root_run_id(message),
                                       run.recording))
            return out

        return await self._once(f"step:{message.idempotency_key}:{message.attempt}", compute)

    def _route(self, after: StepMessage | RunResult | HandOff) -> Outgoing:
        if isinstance(after, RunResult):
            return Outgoing.of(self.names.results(after.workflow), after.run_id, after)
        if isinstance(after, HandOff):
            return Outgoing.of(self.names.approvals, after.run_id, after)
        return Outgoing.of(self.names.step(after.workflow, after.step), after.run_id, after,
                           _trace_header(after))
