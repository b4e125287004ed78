"""The four webhook signature schemes, each checked against an independent computation
(GitHub's against the test vector in its documentation)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from agentfabric.ingress.signatures import (
    SignatureError,
    SignedRequest,
    hubspot_v3_signature,
    hubspot_v3_uri,
    verify,
)

NOW = 1_750_000_000.0
BODY = b'[{"eventId":1,"subscriptionType":"contact.creation","objectId":7}]'
URI = "https://hooks.example.com/webhooks/crm"


def _req(headers: dict[str, str], body: bytes = BODY, uri: str = URI,
         method: str = "POST") -> SignedRequest:
    return SignedRequest(method, uri, body, {k.lower(): v for k, v in headers.items()})


def _hubspot_headers(secret: str, ts_ms: int, body: bytes = BODY, uri: str = URI,
                     ) -> dict[str, str]:
    # exactly as HubSpot documents v3: method + uri + body + timestamp, HMAC-SHA256, base64
    source = f"POST{uri}".encode() + body + str(ts_ms).encode()
    digest = hmac.new(secret.encode(), source, hashlib.sha256).digest()
    return {"X-HubSpot-Signature-v3": base64.b64encode(digest).decode(),
            "X-HubSpot-Request-Timestamp": str(ts_ms)}


def test_hubspot_v3_accepts_a_documented_signature() -> None:
    ts = int(NOW * 1000) - 60_000
    verify("hubspot-v3", _req(_hubspot_headers("s3cret", ts)), "s3cret", now=NOW)
    assert hubspot_v3_signature("s3cret", "post", URI, BODY, str(ts)) == \
        _hubspot_headers("s3cret", ts)["X-HubSpot-Signature-v3"]


@pytest.mark.parametrize(("change", "status", "words"), [
    ({"X-HubSpot-Signature-v3": "AAAA"}, 401, "does not match"),
    ({"X-HubSpot-Request-Timestamp": str(int(NOW * 1000) - 301_000)}, 401, "300 s"),
    ({"X-HubSpot-Request-Timestamp": str(int(NOW * 1000) + 301_000)}, 401, "300 s"),
    ({"X-HubSpot-Request-Timestamp": "yesterday"}, 400, "milliseconds"),
])
def test_hubspot_v3_rejects(change: dict[str, str], status: int, words: str) -> None:
    headers = {**_hubspot_headers("s3cret", int(NOW * 1000)), **change}
    with pytest.raises(SignatureError, match=words) as info:
        verify("hubspot-v3", _req(headers), "s3cret", now=NOW)
    assert info.value.status == status


@pytest.mark.parametrize("missing", ["X-HubSpot-Signature-v3", "X-HubSpot-Request-Timestamp"])
def test_hubspot_v3_missing_header(missing: str) -> None:
    headers = _hubspot_headers("s3cret", int(NOW * 1000))
    del headers[missing]
    with pytest.raises(SignatureError, match=f"{missing} header is missing"):
        verify("hubspot-v3", _req(headers), "s3cret", now=NOW)


def test_hubspot_v3_signature_covers_method_uri_and_body() -> None:
    headers = _hubspot_headers("s3cret", int(NOW * 1000))
    for request in (_req(headers, method="PUT"), _req(headers, uri=URI + "x"),
                    _req(headers, body=BODY + b" ")):
        with pytest.raises(SignatureError):
            verify("hubspot-v3", request, "s3cret", now=NOW)
    with pytest.raises(SignatureError):
        verify("hubspot-v3", _req(headers), "other", now=NOW)


def test_hubspot_v3_uri_decodes_the_listed_escapes_only() -> None:
    assert hubspot_v3_uri("https://x.io/a%3Ab%2Fc?q=%40me%2A&r=%20") == \
        "https://x.io/a:b/c?q=@me*&r=%20"


def _stripe_header(secret: str, t: int, body: bytes = BODY) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def test_stripe_style() -> None:
    t = int(NOW) - 10
    verify("stripe", _req({"Stripe-Signature": _stripe_header("whsec", t)}), "whsec", now=NOW)
    rotated = _stripe_header("old", t) + "," + _stripe_header("whsec", t).split(",")[1]
    verify("stripe", _req({"Stripe-Signature": rotated}), "whsec", now=NOW)
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify("stripe", _req({"Stripe-Signature": _stripe_header("other", t)}), "whsec",
               now=NOW)
    with pytest.raises(SignatureError, match="more than 60 s"):
        verify("stripe", _req({"Stripe-Signature": _stripe_header("whsec", t - 100)}), "whsec",
               tolerance_s=60, now=NOW)
    with pytest.raises(SignatureError, match="t=<unix seconds>") as info:
        verify("stripe", _req({"Stripe-Signature": "v1=abc"}), "whsec", now=NOW)
    assert info.value.status == 400
    with pytest.raises(SignatureError, match="Stripe-Signature header is missing"):
        verify("stripe", _req({}), "whsec", now=NOW)


def test_github_style_matches_githubs_documented_vector() -> None:
    # docs.github.com, "Validating webhook deliveries": the test values
    signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    request = _req({"X-Hub-Signature-256": signature}, body=b"Hello, World!")
    verify("github", request, "It's a Secret to Everybody")
    with pytest.raises(SignatureError, match="does not match"):
        verify("github", request, "another secret")
    with pytest.raises(SignatureError, match="sha256=<hex>"):
        verify("github", _req({"X-Hub-Signature-256": "sha1=abc"}), "s")


def test_shared_secret_header() -> None:
    verify("shared-secret", _req({"X-Webhook-Secret": "tok"}), "tok")
    verify("shared-secret", _req({"X-Token": "tok"}), "tok", header="X-Token")
    with pytest.raises(SignatureError, match="does not hold the shared secret"):
        verify("shared-secret", _req({"X-Webhook-Secret": "tok2"}), "tok")
    with pytest.raises(SignatureError, match="missing"):
        verify("shared-secret", _req({}), "tok")


def test_comparisons_are_constant_time() -> None:
    import inspect

    from agentfabric.ingress import signatures

    source = inspect.getsource(signatures)
    assert source.count("hmac.compare_digest(") >= 4
    assert " == signature" not in source
    assert "== expected" not in source
