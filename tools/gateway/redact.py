"""What leaves the gateway: error texts without secrets, results within bounds, redacted fields.

``sanitize_error`` is shared: the gateway runs every tool and service error text through it,
and the llm step may run any text it feeds back to a model through it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from agentfabric.redaction import REDACTED
from agentfabric.redaction import redact as redact_secrets

__all__ = [
    "MAX_ERROR_CHARS",
    "REDACTED",
    "json_result",
    "redact",
    "result_bytes",
    "sanitize_error",
]

MAX_ERROR_CHARS = 400

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e]+")


def sanitize_error(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` made safe to log, audit, show a person or feed back to a model: credentials
    (Authorization headers, bearer tokens, JWTs, API keys, passwords, URL credentials)
    masked, control characters collapsed to a space, at most ``limit`` characters."""
    # the one redaction of the project (agentfabric.redaction), then the gateway's bounds
    text = redact_secrets(_CONTROL.sub(" ", str(text)))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: max(limit - 1, 0)].rstrip() + "…"
    return text


def json_result(result: Any) -> Any:
    """A tool's result as plain JSON values (models dumped, dates and decimals as text)."""
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    return json.loads(json.dumps(result, default=str))


def result_bytes(result: Any) -> int:
    """The size of a (plain JSON) result as compact UTF-8 JSON."""
    return len(json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode())


def redact(result: Any, paths: Sequence[str]) -> Any:
    """A copy of ``result`` with each dotted path replaced by ``"[redacted]"``. A path step
    that meets a list applies to every item (``contacts.email`` masks each contact's e-mail);
    a path that is not there is ignored."""
    for path in paths:
        result = _redact(result, path.split("."))
    return result


def _redact(value: Any, parts: list[str]) -> Any:
    if isinstance(value, list):
        if parts and parts[0].isdigit():
            index = int(parts[0])
            if index >= len(value):
                return value
            copy = list(value)
            copy[index] = REDACTED if len(parts) == 1 else _redact(value[index], parts[1:])
            return copy
        return [_redact(item, parts) for item in value]
    if not isinstance(value, dict) or not parts or parts[0] not in value:
        return value
    head, rest = parts[0], parts[1:]
    return {**value, head: REDACTED if not rest else _redact(value[head], rest)}
