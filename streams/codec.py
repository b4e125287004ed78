"""Reading records at the runtime's edge: agentfabric's Avro messages and plain JSON events
from producers that are not agentfabric (Kafka Connect, Debezium, another team's service)."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from agentfabric.errors import DecodeError, MessageValidationError
from schemas.models import StepMessage, TriggerEvent
from schemas.serde import SCHEMA_HEADER, decode, header_value, validation_reason

__all__ = ["FIRST_FAILURE_HEADER", "REPLAY_HEADER", "RETRY_DUE_HEADER", "TRACE_HEADER",
           "TenantOf", "decode_trigger", "header_ms", "header_text", "trace_header", "trace_of"]

TRACE_HEADER = "traceparent"
RETRY_DUE_HEADER = "af-retry-due"          # epoch ms when a run on a retry topic is due
FIRST_FAILURE_HEADER = "af-first-failure"  # epoch ms of a run's first failed attempt at a step
REPLAY_HEADER = "af-replay-of"  # the dead letter a replayed record came from


TenantOf = Callable[[ConsumerRecord, TriggerEvent, str | None], str]
"""The tenant a trigger record's runs belong to, given the decoded event and the tenant its
body names (None: no tenant in a JSON body); raises a PermanentError to refuse the record."""


def decode_trigger(record: ConsumerRecord, source: str,
                   tenant_of: TenantOf | None = None) -> TriggerEvent:
    """An agentfabric (Avro) trigger, or a plain JSON event from any other producer; with
    ``tenant_of``, the event's tenant is the one it decides (see agentfabric.tenancy)."""
    named: str | None
    if header_value(record.headers, SCHEMA_HEADER) is not None:
        event = decode(record.value, record.headers, TriggerEvent)
        named = event.tenant
    else:
        try:
            data = json.loads(record.value or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"the value is neither an agentfabric message nor JSON ({exc}); "
                              f"send a JSON object with event_type and payload") from exc
        except RecursionError as exc:
            raise DecodeError("the JSON value is nested too deeply to read; send a flatter "
                              "event") from exc
        if not isinstance(data, dict):
            raise MessageValidationError(f"the event is a JSON {type(data).__name__}, not an "
                                         f"object; send an object with event_type and payload")
        data.setdefault("source", source)
        try:
            event = TriggerEvent.model_validate(data)
        except ValidationError as exc:
            raise MessageValidationError(f"the event does not fit the TriggerEvent schema: "
                                         f"{validation_reason(exc)}") from exc
        named = event.tenant if "tenant" in data else None
    if event.source != source:
        raise MessageValidationError(f"the event says source '{event.source}' but arrived on "
                                     f"the trigger topic of '{source}'; publish it to that "
                                     f"source's topic")
    if tenant_of is not None:
        tenant = tenant_of(record, event, named)
        if tenant != event.tenant:
            event = event.model_copy(update={"tenant": tenant})
    return event


def trace_of(record: ConsumerRecord) -> str | None:
    """The W3C traceparent a record carries, if any."""
    incoming = header_value(record.headers, TRACE_HEADER)
    return incoming.decode("utf-8", "replace") if incoming else None


def trace_header(message: StepMessage) -> tuple[tuple[str, bytes], ...]:
    return ((TRACE_HEADER, message.trace_parent.encode()),) if message.trace_parent else ()


def header_ms(record: ConsumerRecord, key: str) -> int | None:
    """An epoch-milliseconds header, or None if absent or not a number."""
    raw = header_value(record.headers, key)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def header_text(record: ConsumerRecord, key: str, limit: int = 200) -> str | None:
    """A short text header (cut at ``limit`` characters), or None if absent."""
    raw = header_value(record.headers, key)
    return raw[:limit].decode("utf-8", "replace") if raw is not None else None
