"""Log lines captured into a string for tests; the root logger and structlog restored."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import structlog

from agentfabric.logs import LogFormat, configure_logging

__all__ = ["captured_logs"]


@contextlib.contextmanager
def captured_logs(level: str = "DEBUG", fmt: LogFormat = "json") -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, old_level = list(root.handlers), root.level
    stream = io.StringIO()
    handler = configure_logging(level, fmt, stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        for old in handlers:
            root.addHandler(old)
        root.setLevel(old_level)
        structlog.reset_defaults()
