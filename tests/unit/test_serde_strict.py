"""A header that names the wrong schema version, or trailing bytes, is a decode error, never
a message that silently lost fields."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agentfabric.errors import DecodeError
from schemas.models import StepMessage
from schemas.serde import SCHEMA_HEADER, decode, encode


def message() -> StepMessage:
    return StepMessage(run_id="r", workflow="w", workflow_version=1, step="s",
                       idempotency_key="k", input={"a": 1}, event_id="e", source="crm",
                       event_type="lead.created", started_at=datetime.now(UTC))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_version_in_the_header_is_refused(version: int) -> None:
    value, _ = encode(message())
    with pytest.raises(DecodeError, match="names the wrong schema version"):
        decode(value, [(SCHEMA_HEADER, f"step_message.v{version}".encode())], StepMessage)


def test_trailing_bytes_are_refused() -> None:
    value, headers = encode(message())
    with pytest.raises(DecodeError, match=r"\(3 bytes left over\)"):
        decode(value + b"abc", headers, StepMessage)


def test_the_right_header_still_reads() -> None:
    value, headers = encode(message())
    assert decode(value, headers, StepMessage).input == {"a": 1}
