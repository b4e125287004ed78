"""Structured logs: every ``logging.getLogger(__name__)`` line of the project (and of its
libraries) rendered by structlog, as JSON lines (workers, ingress, servers) or for a person
(``console``).

The pipeline is a list of plain callables (structlog's convention)::

    merge_contextvars     fields bound with structlog.contextvars
    merge_record_fields   run_id, workflow, step, tenant, trace_id, consumer bound by the
                          runtime's log_context stage around each record
    add_log_level, add_logger_name, TimeStamper(iso, UTC)
    ExtraAdder            fields passed as logging's ``extra=``
    format_exc_info       exceptions as text
    redact_secrets        every string value (message and exception included) through
                          agentfabric.redaction.redact, the project's one redaction
    JSONRenderer | ConsoleRenderer

A JSON line::

    {"event": "dead letter ...", "level": "warning", "logger": "streams.dlq",
     "timestamp": "2026-01-01T00:00:00.000000Z", "run_id": "...", "workflow": "...",
     "step": "...", "tenant": "...", "trace_id": "...", "reason": "...", ...}
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any, Literal

import structlog
from structlog.typing import Processor

from streams.logcontext import merge_record_fields

from .redaction import redact_value

__all__ = ["LogFormat", "configure_logging", "redact_secrets", "shared_processors"]

LogFormat = Literal["json", "console"]

# noisy libraries: their INFO lines are connection chatter
QUIET = {"aiokafka": logging.WARNING, "kafka": logging.WARNING, "httpx": logging.WARNING,
         "httpcore": logging.WARNING, "openai": logging.WARNING}


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any],
                   ) -> MutableMapping[str, Any]:
    """A structlog processor: every value of the event dict redacted (a credential-named
    field, e.g. ``api_key=...``, masked whole)."""
    redacted = redact_value(dict(event_dict))
    event_dict.clear()
    event_dict.update(redacted)
    return event_dict


def shared_processors() -> list[Processor]:
    """What every line gets before it is rendered (stdlib and structlog loggers alike)."""
    return [structlog.contextvars.merge_contextvars, merge_record_fields,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ExtraAdder()]


def configure_logging(level: str | int = "INFO", fmt: LogFormat = "json", *,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Route every log line through structlog to ``stream`` (default stderr): JSON lines, or
    ``console`` lines for a person. Replaces the root logger's handlers; returns the one
    installed (a test may remove it)."""
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; use json or console")
    target = stream or sys.stderr
    renderer: Processor = (structlog.processors.JSONRenderer(default=str) if fmt == "json"
                           else structlog.dev.ConsoleRenderer(colors=target.isatty()))
    # exceptions become text before redaction: a traceback may quote a secret too
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                              structlog.processors.format_exc_info, redact_secrets, renderer]
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared_processors(),
                                                    processors=final)
    handler = logging.StreamHandler(target)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    # structlog's own loggers (structlog.get_logger) go through the same handler
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared_processors(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger, cache_logger_on_first_use=True)
    return handler
