"""Audit events: one per tool call, on the audit topic (``<prefix>.audit``), as JSON.

An event says who called what for whom, how it ended and how long it took; never the
arguments themselves, only their hash (sha256 of their canonical JSON), so an auditor can
match a call without the topic holding personal data. The Kafka value is the event as
UTF-8 JSON (header ``content-type: application/json``), the key the run id.

The sink is off the call path: :meth:`AuditSink.emit` only queues the event; the Kafka sink
sends queued events in batches from a background task and logs (and counts) what the
broker did not take. :meth:`AuditSink.flush` awaits everything queued so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from agentfabric.errors import AgentFabricError
from schemas.models import canonical_json
from streams.kafka import Outgoing
from streams.logcontext import detached_task

__all__ = [
    "AUDIT_CONTENT_TYPE",
    "AuditEvent",
    "AuditSink",
    "KafkaAuditSink",
    "LogAuditSink",
    "MemoryAuditSink",
    "Outcome",
    "arguments_hash",
]

AUDIT_CONTENT_TYPE = b"application/json"
Outcome = Literal["ok", "error", "refused", "invalid_arguments", "rate_limited",
                  "circuit_open", "approval_required", "fallback", "timeout"]
log = logging.getLogger(__name__)


def arguments_hash(arguments: Mapping[str, Any]) -> str:
    """sha256 (hex) of the arguments' canonical JSON (sorted keys, compact)."""
    text = canonical_json(json.loads(json.dumps(dict(arguments), default=str)))
    return hashlib.sha256(text.encode()).hexdigest()


class AuditEvent(BaseModel):
    """One tool call as the audit topic records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    agent: str
    tenant: str
    run_id: str
    workflow: str = ""
    step: str = ""
    tool: str
    access: Literal["read", "write"] | None = None
    arguments_hash: str
    outcome: Outcome
    reason: str = ""
    latency_ms: float = 0.0
    attempts: int = 0
    idempotency_key: str

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class AuditSink(Protocol):
    """Where audit events go. ``emit`` must not block or raise on the call path."""

    def emit(self, event: AuditEvent) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class MemoryAuditSink:
    """Keeps events in a list (tests)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def outcomes(self) -> list[str]:
        return [e.outcome for e in self.events]

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


class LogAuditSink:
    """Logs each event (as JSON, at ``level``) on the ``tools.gateway.audit`` logger: the sink of
    a gateway built without a Kafka producer."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        self.level = level

    def emit(self, event: AuditEvent) -> None:
        if log.isEnabledFor(self.level):
            log.log(self.level, "audit %s", event.model_dump_json())

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Sender(Protocol):
    """What the Kafka sink needs of a producer (``streams.kafka.Producer`` fits)."""

    async def send_all(self, messages: Sequence[Outgoing]) -> None: ...


class KafkaAuditSink:
    """Sends events to ``topic`` (key: run id) in batches of at most ``batch`` from one
    background task, so no tool call waits for the broker's acknowledgement. At most
    ``max_pending`` events wait; beyond that new ones are dropped and counted (``dropped``)
    rather than let an unreachable broker grow memory without bound. Batches the broker
    refuses are logged and counted (``failed``)."""

    def __init__(self, producer: Sender, topic: str, *, batch: int = 500,
                 max_pending: int = 100_000) -> None:
        self._producer = producer
        self.topic = topic
        self._batch = batch
        self._max_pending = max_pending
        self._queue: deque[AuditEvent] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0
        self.sent = self.failed = self.dropped = 0

    @property
    def pending(self) -> int:
        """Events emitted and not yet sent (or failed)."""
        return len(self._queue) + self._in_flight

    def emit(self, event: AuditEvent) -> None:
        if self._closed:
            raise AgentFabricError("the audit sink is closed; emit before closing the gateway")
        if len(self._queue) >= self._max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit: %d events dropped: %d are waiting for the broker (topic %s)",
                          self.dropped, len(self._queue), self.topic)
            return
        self._queue.append(event)
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = detached_task(self._drain(), name="audit-sink")

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            events = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            messages = [Outgoing(self.topic, e.run_id.encode(), e.to_json(),
                                 (("content-type", AUDIT_CONTENT_TYPE),))
                        for e in events]
            self._in_flight = len(events)
            try:
                await self._producer.send_all(messages)
            except AgentFabricError as exc:
                self.failed += len(events)
                log.error("audit: %d events not delivered to %s: %s", len(events),
                          self.topic, exc.reason)
            except Exception:  # a bug must not stop auditing or hang flush(): log it
                self.failed += len(events)
                log.exception("audit: %d events not delivered to %s", len(events), self.topic)
            else:
                self.sent += len(events)
            finally:
                self._in_flight = 0

    async def flush(self) -> None:
        """Return once every event emitted so far was sent (or failed)."""
        if self._task is not None and not self._task.done():
            await self._idle.wait()

    async def close(self) -> None:
        self._closed = True
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
