"""What leaves the gateway: error texts without credentials or control characters, bounded;
results with redacted fields."""

from __future__ import annotations

import pytest

from tools.gateway.redact import REDACTED, json_result, redact, result_bytes, sanitize_error


@pytest.mark.parametrize(("text", "secret"), [
    ("upstream said: Authorization: Bearer abc.def.ghi-123456", "abc.def.ghi-123456"),
    ("header authorization=Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl leaked", "eyJhbGciOiJIUzI1NiJ9"),
    ('{"api_key": "k-123456789", "x": 1}', "k-123456789"),
    ("GET /x?apikey=SECRET123&y=2 failed", "SECRET123"),
    ("key sk-proj-ABCDEFGHIJKLMNOPQRSTUV in body", "sk-proj-ABCDEFGHIJKLMNOPQRSTUV"),
    ("connect to postgres://admin:hunter2@db:5432 refused", "hunter2"),
    ("password: hunter2", "hunter2"),
    ("X-Api-Key: 0123456789abcdef", "0123456789abcdef"),
])
def test_sanitize_masks_credentials(text: str, secret: str) -> None:
    clean = sanitize_error(text)
    assert secret not in clean
    assert REDACTED in clean


def test_sanitize_keeps_ordinary_text() -> None:
    text = "invalid request body: score: Input should be less than or equal to 100"
    assert sanitize_error(text) == text
    assert sanitize_error("token_count: 5, keyboard layout") == "token_count: 5, keyboard layout"


def test_sanitize_removes_control_characters_and_bounds_length() -> None:
    clean = sanitize_error("line one\nline\x00two\x1b[31m red\u202e", limit=1000)
    assert clean == "line one line two [31m red"
    long = sanitize_error("x" * 5000, limit=100)
    assert len(long) == 100
    assert long.endswith("…")


def test_redact_dotted_paths_through_lists() -> None:
    result = {"name": "Acme", "owner": {"email": "a@x.io", "phone": "1"},
              "contacts": [{"email": "b@x.io"}, {"email": "c@x.io", "n": 2}],
              "ids": ["one", "two"]}
    out = redact(result, ["owner.email", "contacts.email", "ids.1", "missing.path"])
    assert out == {"name": "Acme", "owner": {"email": REDACTED, "phone": "1"},
                   "contacts": [{"email": REDACTED}, {"email": REDACTED, "n": 2}],
                   "ids": ["one", REDACTED]}
    assert result["owner"]["email"] == "a@x.io"  # the original is untouched


def test_json_result_and_size() -> None:
    import datetime
    from decimal import Decimal

    value = json_result({"when": datetime.date(2024, 5, 31), "amount": Decimal("1.50")})
    assert value == {"when": "2024-05-31", "amount": "1.50"}
    assert result_bytes({"a": "é"}) == len('{"a":"é"}'.encode())
