"""What a record's log lines say about it: the fields bound around its processing (run id,
workflow, step, tenant, trace id, consumer) and the one line each dead letter gets.

The runtime binds the fields once, in the ``log_context`` stage (``streams.stages``), as one
context variable (:func:`record_fields`: one set and one reset per record, where binding
each field as its own structlog context variable cost about 7 µs); every log line written
while the record is processed, by any module through the standard ``logging`` module,
carries them (``agentfabric.logs`` merges them in, with :func:`merge_record_fields`).
Nothing here configures logging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from types import MappingProxyType
from typing import Any, TypeVar

from schemas.models import DeadLetter

from .executor import Job

__all__ = ["detached_task", "job_fields", "log_dead_letter", "merge_record_fields",
           "record_fields", "trace_id_of"]

log = logging.getLogger("streams.dlq")
T = TypeVar("T")

_NONE: Mapping[str, str] = MappingProxyType({})
_bound: ContextVar[Mapping[str, str]] = ContextVar("agentfabric_record_fields", default=_NONE)


@contextmanager
def record_fields(fields: Mapping[str, str]) -> Iterator[None]:
    """Bind ``fields`` to every log line written in this context (and the tasks it starts)
    until the block ends."""
    token = _bound.set(fields)
    try:
        yield
    finally:
        _bound.reset(token)


def detached_task(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
    """Start a task shared by many records (a lease keeper, a Redis flush, the audit sink)
    without the fields of the record that happens to start it: a task copies its creator's
    context, so it would otherwise log every later line as that one record's."""
    context = copy_context()
    context.run(_bound.set, _NONE)
    return asyncio.get_running_loop().create_task(coro, name=name, context=context)


def merge_record_fields(_: Any, __: str, event_dict: MutableMapping[str, Any],
                        ) -> MutableMapping[str, Any]:
    """A structlog processor: the bound record's fields, where the line does not set its
    own."""
    for name, value in _bound.get().items():
        event_dict.setdefault(name, value)
    return event_dict

_FIELDS = ("run_id", "workflow", "step", "tenant")


def trace_id_of(trace_parent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``), if it has
    one."""
    parts = (trace_parent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return parts[1]
    return None


def job_fields(job: Job, consumer: str) -> dict[str, str]:
    """The log fields of a decoded record: those its run envelope (or, without one, its
    message: a trigger event has a tenant, a hand-off a run) names, its trace id (the job's,
    else its message's) and the consumer processing it."""
    source = job.subject if job.subject is not None else job.message
    fields = {"consumer": consumer}
    for name in _FIELDS:
        value = getattr(source, name, None)
        if isinstance(value, str) and value:
            fields[name] = value
    trace = job.trace_parent or getattr(source, "trace_parent", None)
    trace_id = trace_id_of(trace if isinstance(trace, str) else None)
    if trace_id is not None:
        fields["trace_id"] = trace_id
    return fields


def log_dead_letter(letter: DeadLetter) -> None:
    """The one log line of a dead letter: WARNING, with its reason and error class (both
    already redacted) and the run it belongs to."""
    extra: dict[str, object] = {
        "dead_letter_id": letter.dead_letter_id, "reason": letter.reason,
        "error_type": letter.error_type, "transient": letter.transient,
        "topic": letter.topic, "partition": letter.partition, "offset": letter.offset,
        "attempts": letter.attempts}
    for name in _FIELDS:
        value = getattr(letter, name)
        if value:
            extra[name] = value
    trace_id = trace_id_of(letter.trace_parent)
    if trace_id is not None:
        extra["trace_id"] = trace_id
    log.warning("dead letter %s from %s[%d]@%d: %s: %s", letter.dead_letter_id, letter.topic,
                letter.partition, letter.offset, letter.error_type, letter.reason, extra=extra)
