"""The webhook signature schemes. Each verifier takes the raw request and raises
:class:`SignatureError` (with the HTTP status to answer) unless the request is authentic.

- ``hubspot-v3``  ``X-HubSpot-Signature-v3`` = base64(HMAC-SHA256(secret, method + uri + body +
  timestamp)), ``X-HubSpot-Request-Timestamp`` in milliseconds, older than 5 minutes: rejected
  (HubSpot's "Validating requests" page, signature v3).
- ``stripe``      ``Stripe-Signature: t=<unix s>,v1=<hex>[,v1=<hex>]``, hex HMAC-SHA256 over
  ``f"{t}.{body}"``; a timestamp further than ``tolerance_s`` from now is rejected.
- ``github``      ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``.
- ``shared-secret`` a header carrying the secret itself.

Every comparison of a secret or a MAC is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from agentfabric.errors import AgentFabricError

__all__ = [
    "HUBSPOT_WINDOW_S",
    "SCHEMES",
    "Scheme",
    "SignatureError",
    "SignedRequest",
    "hubspot_v3_signature",
    "hubspot_v3_uri",
    "verify",
]

Scheme = Literal["hubspot-v3", "stripe", "github", "shared-secret"]
SCHEMES: tuple[Scheme, ...] = ("hubspot-v3", "stripe", "github", "shared-secret")
HUBSPOT_WINDOW_S = 300.0
DEFAULT_HEADERS: dict[Scheme, str] = {
    "hubspot-v3": "X-HubSpot-Signature-v3", "stripe": "Stripe-Signature",
    "github": "X-Hub-Signature-256", "shared-secret": "X-Webhook-Secret"}
HUBSPOT_TIMESTAMP = "X-HubSpot-Request-Timestamp"
# HubSpot signs the URI with these escapes decoded (the '?' that starts the query aside)
_HUBSPOT_DECODED = ("%3A", "%2F", "%3F", "%40", "%21", "%24", "%27", "%28", "%29", "%2A",
                    "%2C", "%3B")


class SignatureError(AgentFabricError):
    """The request is not authentic (401), or not checkable as sent (400)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SignedRequest:
    """What the schemes read from a request: method, the URI as the sender called it, the
    raw body, headers with lower-case names."""

    method: str
    uri: str
    body: bytes
    headers: Mapping[str, str]


def _mac(secret: str, message: bytes) -> bytes:
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def _header(request: SignedRequest, name: str) -> str:
    value = request.headers.get(name.lower())
    if not value:
        raise SignatureError(f"the {name} header is missing; the sender must sign the request")
    return value


def hubspot_v3_uri(uri: str) -> str:
    """The URI as HubSpot signs it: the listed %-escapes decoded, the query's '?' kept."""
    path, sep, query = uri.partition("?")
    for escape in _HUBSPOT_DECODED:
        path = path.replace(escape, unquote(escape)).replace(escape.lower(), unquote(escape))
        query = query.replace(escape, unquote(escape)).replace(escape.lower(), unquote(escape))
    return path + sep + query


def hubspot_v3_signature(secret: str, method: str, uri: str, body: bytes,
                         timestamp_ms: str) -> str:
    """base64(HMAC-SHA256(secret, method + uri + body + timestamp))."""
    message = method.upper().encode() + hubspot_v3_uri(uri).encode() + body + \
        timestamp_ms.encode()
    return base64.b64encode(_mac(secret, message)).decode()


def _hubspot_v3(request: SignedRequest, secret: str, header: str, tolerance_s: float,
                now: float) -> None:
    signature = _header(request, header)
    stamp = _header(request, HUBSPOT_TIMESTAMP)
    try:
        sent_ms = int(stamp)
    except ValueError:
        raise SignatureError(f"{HUBSPOT_TIMESTAMP} '{stamp[:40]}' is not a time in "
                             f"milliseconds", 400) from None
    window = min(tolerance_s, HUBSPOT_WINDOW_S)
    if abs(now - sent_ms / 1000) > window:
        raise SignatureError(f"the request timestamp is more than {window:.0f} s from now; "
                             f"a stale (or replayed) delivery is refused")
    expected = hubspot_v3_signature(secret, request.method, request.uri, request.body, stamp)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise SignatureError("the HubSpot v3 signature does not match; check the client "
                             "secret and the public URL the app calls")


def _stripe(request: SignedRequest, secret: str, header: str, tolerance_s: float,
            now: float) -> None:
    value = _header(request, header)
    stamps, signatures = [], []
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        if key == "t":
            stamps.append(item)
        elif key == "v1":
            signatures.append(item)
    if len(stamps) != 1 or not stamps[0].isdigit() or not signatures:
        raise SignatureError(f"the {header} header must be 't=<unix seconds>,v1=<hex>'", 400)
    if abs(now - int(stamps[0])) > tolerance_s:
        raise SignatureError(f"the signature's timestamp is more than {tolerance_s:.0f} s from "
                             f"now; a stale (or replayed) delivery is refused")
    expected = _mac(secret, stamps[0].encode() + b"." + request.body).hex().encode()
    # compare against every v1 (the sender may sign with an old and a new secret)
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate.strip().lower().encode())
    if not matched:
        raise SignatureError("no v1 signature matches; check the signing secret")


def _github(request: SignedRequest, secret: str, header: str, tolerance_s: float,
            now: float) -> None:
    value = _header(request, header)
    scheme, _, digest = value.strip().partition("=")
    if scheme != "sha256" or not digest:
        raise SignatureError(f"the {header} header must be 'sha256=<hex>'", 400)
    expected = _mac(secret, request.body).hex().encode()
    if not hmac.compare_digest(expected, digest.lower().encode()):
        raise SignatureError("the sha256 signature does not match; check the webhook secret")


def _shared_secret(request: SignedRequest, secret: str, header: str, tolerance_s: float,
                   now: float) -> None:
    value = _header(request, header)
    if not hmac.compare_digest(secret.encode(), value.encode()):
        raise SignatureError(f"the {header} header does not hold the shared secret")


_VERIFIERS: dict[Scheme, Callable[[SignedRequest, str, str, float, float], None]] = {
    "hubspot-v3": _hubspot_v3, "stripe": _stripe, "github": _github,
    "shared-secret": _shared_secret}


def verify(scheme: Scheme, request: SignedRequest, secret: str, *, header: str | None = None,
           tolerance_s: float = 300.0, now: float | None = None) -> None:
    """Raise :class:`SignatureError` unless ``request`` carries a valid ``scheme`` signature
    (``header``: the signature header's name, default the scheme's own)."""
    _VERIFIERS[scheme](request, secret, header or DEFAULT_HEADERS[scheme], tolerance_s,
                       time.time() if now is None else now)
