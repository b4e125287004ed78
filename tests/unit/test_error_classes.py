"""One classification of errors: transient ones retry on the tiers, permanent ones
dead-letter at once."""

from __future__ import annotations

import httpx
import openai
import pytest

from agentfabric.errors import (
    ConfigError,
    DecodeError,
    MessageValidationError,
    PermanentError,
    ToolError,
    TransientError,
    UnavailableError,
)
from agents.models import transient


def status_error(code: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://model/v1/chat/completions")
    response = httpx.Response(code, headers=headers or {}, request=request)
    return openai.APIStatusError(f"status {code}", response=response, body=None)


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503, 504])
def test_model_rate_limits_timeouts_and_server_errors_are_transient(code: int) -> None:
    assert transient(status_error(code))


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
def test_model_request_errors_are_permanent(code: int) -> None:
    assert not transient(status_error(code))


def test_the_server_may_say_otherwise() -> None:
    assert not transient(status_error(503, {"x-should-retry": "false"}))
    assert transient(status_error(400, {"x-should-retry": "true"}))


def test_timeouts_and_lost_connections_are_transient() -> None:
    request = httpx.Request("POST", "http://model/v1/chat/completions")
    assert transient(openai.APITimeoutError(request=request))
    assert transient(openai.APIConnectionError(request=request))


@pytest.mark.parametrize(("error", "is_transient"), [
    (UnavailableError("redis down"), True), (TransientError("timeout"), True),
    (DecodeError("bytes"), False), (MessageValidationError("schema"), False),
    (ToolError("bad arguments"), False), (ConfigError("no such tool"), False),
    (PermanentError("refused"), False),
])
def test_the_hierarchy_decides(error: Exception, is_transient: bool) -> None:
    assert isinstance(error, TransientError) is is_transient
