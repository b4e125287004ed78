"""Avro binary encoding with the writer's schema named in a message header.

A message carries ``af-schema: <name>.v<N>``; the reader resolves the writer's
schema from the versions shipped in ``schemas/avro`` and reads it into the latest
version (Avro schema resolution), so old messages stay readable after an upgrade.
A message nested inside another (a caller's envelope, a hand-off's, a recording's) keeps
the same id in a string field beside its bytes: :func:`seal` and :func:`unseal`.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import fastavro
from pydantic import ValidationError

from agentfabric.errors import DecodeError, MessageValidationError

from .models import AvroModel

__all__ = [
    "CONTENT_TYPE",
    "CONTENT_TYPE_HEADER",
    "SCHEMA_HEADER",
    "KafkaHeaders",
    "decode",
    "encode",
    "header_value",
    "latest_version",
    "parsed_schema",
    "schema_versions",
    "seal",
    "unseal",
    "validation_reason",
]

SCHEMA_HEADER = "af-schema"
CONTENT_TYPE_HEADER = "content-type"
CONTENT_TYPE = b"avro/binary"
_FILE = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.avsc$")

KafkaHeaders = Sequence[tuple[str, bytes | None]]
M = TypeVar("M", bound=AvroModel)


@cache
def schema_versions() -> dict[str, dict[int, dict[str, Any]]]:
    """Every shipped schema: name -> version -> schema JSON (read on first use)."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for entry in resources.files("schemas").joinpath("avro").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.setdefault(match["name"], {})[int(match["version"])] = json.loads(
                entry.read_text(encoding="utf-8")
            )
    return found


def latest_version(name: str) -> int:
    return max(schema_versions()[name])


@cache
def parsed_schema(name: str, version: int) -> Any:
    return fastavro.parse_schema(schema_versions()[name][version])


def header_value(headers: KafkaHeaders | None, key: str) -> bytes | None:
    for k, v in headers or ():
        if k == key:
            return v
    return None


def encode(model: AvroModel) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Avro-encode ``model`` with the latest version of its schema; returns value and headers."""
    value, schema_id = seal(model)
    return value, [(SCHEMA_HEADER, schema_id.encode()), (CONTENT_TYPE_HEADER, CONTENT_TYPE)]


def validation_reason(exc: ValidationError) -> str:
    """A pydantic error as one readable sentence: each bad field and what is wrong."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "the message"
        parts.append(f"{where}: {err['msg']}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


def decode(value: bytes | None, headers: KafkaHeaders | None, model: type[M]) -> M:
    """Read an Avro message of ``model``'s schema written with the version in its header."""
    raw_id = header_value(headers, SCHEMA_HEADER)
    if raw_id is None:
        raise DecodeError(f"the message has no '{SCHEMA_HEADER}' header, so it is not an "
                          f"agentfabric {model.__name__}; produce it with agentfabric")
    schema_id = raw_id.decode("utf-8", "replace")
    name, _, version_text = schema_id.rpartition(".v")
    if name != model.avro_name:
        raise DecodeError(f"expected a {model.avro_name} message but its header says "
                          f"'{schema_id}'; it was produced to the wrong topic")
    versions = schema_versions().get(name, {})
    if not version_text.isdigit() or int(version_text) not in versions:
        raise DecodeError(f"schema '{schema_id}' is not known to this worker (it knows versions "
                          f"{sorted(versions)}); upgrade the worker, then replay the dead letter")
    if value is None:
        raise DecodeError("the message has no value (a tombstone); nothing to process")
    buffer = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(
            buffer, parsed_schema(name, int(version_text)),
            parsed_schema(name, latest_version(name)),
        )
    except Exception as exc:  # fastavro raises many unrelated types on corrupt bytes
        raise DecodeError(f"the bytes are not a valid '{schema_id}' record "
                          f"({type(exc).__name__}); the producer wrote something else") from exc
    left = len(value) - buffer.tell()
    if left:
        raise DecodeError(f"the bytes are longer than a '{schema_id}' record ({left} bytes "
                          f"left over); the header names the wrong schema version or the "
                          f"value is corrupt")
    if not isinstance(record, dict):
        raise DecodeError(f"'{schema_id}' did not decode to a record; the producer wrote "
                          f"something else")
    try:
        return model.from_avro(record)
    except (ValidationError, ValueError) as exc:
        detail = validation_reason(exc) if isinstance(exc, ValidationError) else str(exc)
        raise MessageValidationError(f"the {model.__name__} does not fit its schema: {detail}") \
            from exc


def seal(model: AvroModel) -> tuple[bytes, str]:
    """Encode ``model`` for nesting inside another message: its bytes and its schema id
    (``<name>.v<N>``, what the ``envelope_schema`` fields hold)."""
    version = latest_version(model.avro_name)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema(model.avro_name, version), model.to_avro())
    return buf.getvalue(), f"{model.avro_name}.v{version}"


def unseal(envelope: bytes, schema_id: str, model: type[M]) -> M:
    """Read a nested message written by :func:`seal`; a wrong or unknown ``schema_id`` is a
    DecodeError, as for a top-level message."""
    return decode(envelope, [(SCHEMA_HEADER, schema_id.encode())], model)
