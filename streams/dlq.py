"""Dead letters: build the envelope for a message that failed, and read them back.

The envelope keeps the original bytes, key and headers (secret-looking header values
redacted) so the message can be inspected and replayed, plus a one-sentence reason.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

from aiokafka import ConsumerRecord

from agentfabric.errors import AgentFabricError, DecodeError, MessageValidationError
from agentfabric.settings import Settings
from schemas.models import DeadLetter, Header, StepMessage
from schemas.serde import decode

from .kafka import Outgoing
from .reader import read_topic

__all__ = ["SECRET_HEADER", "dead_letter", "read_dead_letters", "redact"]

SECRET_HEADER = re.compile(r"(authorization|secret|token|signature|password|passwd|api[-_]?key"
                           r"|cookie|session|credential|hmac)", re.IGNORECASE)
SECRET_TEXT = re.compile(
    r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"          # user:password@ in URLs
    r"|(?P<kv>\b(?:api[-_]?key|access[-_]?token|token|secret|password|passwd|sig|signature)"
    r"\s*[=:]\s*)[^\s&,;'\"]+"                                          # key=value / key: value
    r"|(?P<bearer>\bBearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Mask credentials that may appear in an error message."""
    def mask(match: re.Match[str]) -> str:
        prefix = match["scheme"] or match["kv"] or match["bearer"] or ""
        return f"{prefix}***@" if match["scheme"] else f"{prefix}***"
    return SECRET_TEXT.sub(mask, text)
REDACTED = b"[redacted]"


def dead_letter(record: ConsumerRecord, error: Exception, *, group: str, dlq_topic: str,
                message: StepMessage | None = None, note: str = "") -> Outgoing:
    """The dead-letter message for ``record`` that failed with ``error`` (``note`` is added
    to the reason in brackets)."""
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
    letter = DeadLetter(
        dead_letter_id=str(uuid.uuid4()), reason=redact(reason), error_type=error_type,
        topic=record.topic, partition=record.partition, offset=record.offset,
        consumer_group=group, key=record.key, value=record.value, headers=headers,
        run_id=message.run_id if message else None,
        workflow=message.workflow if message else None,
        step=message.step if message else None,
        tenant=message.tenant if message else None,
        attempts=message.attempt if message else 1)
    key = record.key.decode("utf-8", "replace") if record.key else letter.dead_letter_id
    return Outgoing.of(dlq_topic, key, letter)


async def read_dead_letters(settings: Settings, topic: str) -> AsyncIterator[DeadLetter]:
    """Every dead letter on ``topic`` so far; unreadable entries are reported, not skipped."""
    async for record in read_topic(settings, topic):
        try:
            yield decode(record.value, record.headers, DeadLetter)
        except (DecodeError, MessageValidationError) as exc:
            yield DeadLetter(dead_letter_id=f"unreadable-{record.partition}-{record.offset}",
                             reason=f"this entry of the dead-letter topic is unreadable: "
                                    f"{exc.reason}", error_type=type(exc).__name__,
                             topic=topic, partition=record.partition, offset=record.offset,
                             consumer_group="", value=record.value)
