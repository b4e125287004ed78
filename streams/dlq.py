"""Dead letters: build the envelope for a message that failed, and read them back.

The envelope keeps the original bytes, key, headers (secret-looking header values
redacted), topic / partition / offset / timestamp, so the message can be inspected and
replayed, plus a one-sentence reason, whether the failure was transient (its attempts ran
out) or permanent, the first and last failure time and the trace context. A replayed
record carries ``af-replay-of: <dead letter id>`` (see ``agentfabric dlq replay``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord

from agentfabric.errors import (
    AgentFabricError,
    DecodeError,
    MessageValidationError,
    TransientError,
)
from agentfabric.redaction import redact
from agentfabric.settings import Settings
from schemas.models import DeadLetter, Header, StepMessage, utc_now
from schemas.serde import decode

from .codec import FIRST_FAILURE_HEADER, REPLAY_HEADER, header_ms, trace_of
from .kafka import Outgoing
from .logcontext import log_dead_letter

__all__ = ["REDACTED", "SECRET_HEADER", "UNREADABLE_PREFIX", "dead_letter", "from_epoch_ms",
           "is_unreadable", "read_dead_letters", "redact", "replay_of"]

UNREADABLE_PREFIX = "unreadable-"  # id of a stand-in for an unreadable dead-letter entry

SECRET_HEADER = re.compile(r"(authorization|secret|token|signature|password|passwd|api[-_]?key"
                           r"|cookie|session|credential|hmac)", re.IGNORECASE)
REDACTED = b"[redacted]"


def dead_letter(record: ConsumerRecord, error: Exception, *, group: str, dlq_topic: str,
                message: StepMessage | None = None, note: str = "",
                value_claim: str | None = None, logged: bool = True) -> Outgoing:
    """The dead-letter message for ``record`` that failed with ``error`` (``note`` is added
    to the reason in brackets). ``message`` is the run envelope, when known; ``value_claim``
    the claim check holding the full value when ``record.value`` is an excerpt. The dead
    letter is logged once, at WARNING (``logged=False``: a stand-in for one already logged)."""
    if isinstance(error, AgentFabricError):
        reason, error_type = error.reason, type(error).__name__
    else:
        reason = (f"internal error {type(error).__name__}: {error}; this is a bug in "
                  f"agentfabric or a step, report it and replay the dead letter once fixed")
        error_type = "InternalError"
    if note:
        reason = f"{reason} ({note})"
    headers = [Header(key=k, value=REDACTED if SECRET_HEADER.search(k) else v)
               for k, v in (record.headers or ())]
    failed_at = utc_now()
    first = from_epoch_ms(header_ms(record, FIRST_FAILURE_HEADER))
    letter = DeadLetter(
        dead_letter_id=str(uuid.uuid4()), reason=redact(reason), error_type=error_type,
        transient=isinstance(error, TransientError),
        topic=record.topic, partition=record.partition, offset=record.offset,
        record_timestamp=from_epoch_ms(record.timestamp),
        consumer_group=group, key=record.key, value=record.value, value_claim=value_claim,
        headers=headers,
        run_id=message.run_id if message else None,
        workflow=message.workflow if message else None,
        step=message.step if message else None,
        tenant=message.tenant if message else None,
        trace_parent=trace_of(record) or (message.trace_parent if message else None),
        attempts=message.attempt if message else 1,
        first_failed_at=first if first is not None and first <= failed_at else failed_at,
        failed_at=failed_at)
    key = record.key.decode("utf-8", "replace") if record.key else letter.dead_letter_id
    if logged:
        log_dead_letter(letter)
    return Outgoing.of(dlq_topic, key, letter)


async def read_dead_letters(settings: Settings, topic: str) -> AsyncIterator[DeadLetter]:
    """Every dead letter on ``topic`` so far; unreadable entries are reported, not skipped."""
    from .reader import read_topic  # here: the reader depends on batching, which uses redact

    async for record in read_topic(settings, topic):
        try:
            yield decode(record.value, record.headers, DeadLetter)
        except (DecodeError, MessageValidationError) as exc:
            yield DeadLetter(dead_letter_id=f"{UNREADABLE_PREFIX}{record.partition}-"
                                            f"{record.offset}",
                             reason=f"this entry of the dead-letter topic is unreadable: "
                                    f"{exc.reason}", error_type=type(exc).__name__,
                             topic=topic, partition=record.partition, offset=record.offset,
                             consumer_group="", value=record.value)


def is_unreadable(letter: DeadLetter) -> bool:
    """A stand-in for an entry of the dead-letter topic that could not be read."""
    return letter.dead_letter_id.startswith(UNREADABLE_PREFIX) and not letter.consumer_group


def replay_of(letter: DeadLetter) -> str | None:
    """The id of the dead letter whose replay this dead letter is, if it is one."""
    for header in letter.headers:
        if header.key == REPLAY_HEADER and header.value is not None:
            return header.value.decode("utf-8", "replace")
    return None


def from_epoch_ms(ms: int | None) -> datetime | None:
    """An epoch-milliseconds timestamp as a UTC datetime (exact), or None when there is none
    (Kafka's -1) or it is out of range (a header any producer may have set)."""
    if ms is None or ms < 0:
        return None
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
