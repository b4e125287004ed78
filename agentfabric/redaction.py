"""The one place secrets are masked: log lines, dead-letter reasons, the tool gateway's error
texts and the CLI's output all go through :func:`redact`.

What it masks (the value is replaced by ``[redacted]``, the key name is kept):

- key/value pairs whose key names a credential, in JSON, Python reprs, headers, query
  strings and env files, any case, quoted or not, ``:`` or ``=``: ``api_key``, ``apikey``,
  ``x-api-key``, ``secret``, ``client_secret``, ``password``, ``passwd``, ``pwd``, ``token``,
  ``access_token``, ``refresh_token``, ``authorization``, ``cookie``, ``signature``, and any
  name ending in one of them (``OPENAI_API_KEY=``, ``DB_PASSWORD=``, ``GITHUB_TOKEN=``);
- ``Authorization: Basic|Bearer ...`` and bare bearer tokens;
- credentials in URLs: ``scheme://user:pw@host``, ``scheme://:pw@host``, ``scheme://token@host``;
- well-known key shapes wherever they appear: ``sk-...`` (OpenAI style), JSON web tokens,
  GitHub, AWS access key ids, Slack tokens.

:func:`redact_value` applies it to every string of a JSON-like value (and masks the whole
value of a credential-named key); :func:`terminal_text` is what the CLI prints of text that
came from a payload: redacted, terminal control sequences removed, rich markup escaped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rich.markup import escape

__all__ = ["REDACTED", "is_secret_key", "redact", "redact_value", "strip_control",
           "terminal_text"]

REDACTED = "[redacted]"

_KEY_NAMES = (r"authorization|api[_-]?key|apikey|access[_-]?key|private[_-]?key|"
              r"secret|token|password|passwd|pwd|cookie|signature|sig|credentials?")
# a credential-named key: any name ending in one of the names above
_KEY = rf"[A-Za-z0-9_.-]*?(?:{_KEY_NAMES})"
_SECRET_KEY = re.compile(rf"(?i)^{_KEY}$")

_KEY_VALUE = re.compile(
    rf"(?i)(?<![A-Za-z0-9])(?P<key>{_KEY})"
    r"(?P<sep>\\?[\"']?\s*[:=]\s*)"
    r"(?:(?P<dq>\\?\")(?:[^\"\\]|\\[^\"])*\\?\""          # "value" (or \"value\" inside JSON)
    r"|(?P<sq>')[^']*'"                                     # 'value'
    r"|(?P<scheme>(?:bearer|basic|token)\s+)?[^\s\"',;&}\])]+)")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # credentials inside URLs: scheme://user:password@host, scheme://:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@\"'<>]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 " + REDACTED),
    (re.compile(r"\b(Basic)\s+(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{8,}={0,2}"),
     r"\1 " + REDACTED),
    # JSON web tokens, wherever they appear
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), REDACTED),
    # well-known API key shapes (OpenAI-style, GitHub, AWS access key ids, Slack)
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{10,}"), REDACTED),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), REDACTED),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), REDACTED),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), REDACTED),
)
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e"
                      r"\u2066-\u2069]")


def _mask_pair(match: re.Match[str]) -> str:
    if match["dq"]:
        quote = match["dq"]
        value = f"{quote}{REDACTED}{quote}"
    elif match["sq"]:
        value = f"'{REDACTED}'"
    else:
        value = REDACTED
    return f"{match['key']}{match['sep']}{value}"


def redact(text: str) -> str:
    """``text`` with every credential it shows replaced by ``[redacted]``."""
    text = _KEY_VALUE.sub(_mask_pair, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def is_secret_key(name: str) -> bool:
    """Whether a field called ``name`` holds a credential (``api_key``, ``DB_PASSWORD``)."""
    return bool(_SECRET_KEY.match(name))


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like ``value`` with every string redacted and the value of every
    credential-named key masked whole (its structure, and so valid JSON, kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and is_secret_key(k) and v not in (None, "")
                else redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def strip_control(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (newlines and tabs
    kept): what a payload must not send to someone's terminal."""
    return _CONTROL.sub("", _ANSI.sub("", text))


def terminal_text(value: object) -> str:
    """Payload-derived text as the CLI prints it with rich: redacted, control sequences
    removed, rich markup escaped."""
    return escape(strip_control(redact(str(value))))
