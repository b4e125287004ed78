"""The sample CRM and ERP services in process (aiohttp's test server): every route, tenants,
idempotent writes, 400s, injected faults, statistics and reset."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tools.services import crm, erp
from tools.services.common import serve

Client = TestClient[web.Request, web.Application]
SCORE = {"score": 82, "segment": "enterprise", "owner": "ana"}
INVOICE = {"invoice_id": "INV-1", "amount": "150.00", "currency": "USD",
           "invoice_date": "2024-05-01", "due_date": "2024-05-31", "po_number": None,
           "lines": [{"description": "paper", "quantity": 3, "unit_price": "50.00"}]}
APPROVAL = {"invoice_id": "INV-1", "amount": 150, "currency": "USD", "approver": "cfo",
            "decision": "approve"}


@pytest.fixture
async def crm_client() -> AsyncIterator[Client]:
    async with TestClient(TestServer(crm.create_app())) as client:
        yield client


@pytest.fixture
async def erp_client() -> AsyncIterator[Client]:
    async with TestClient(TestServer(erp.create_app())) as client:
        yield client


async def call(client: Client, method: str, path: str, body: Any = None, *,
               key: str | None = None, tenant: str | None = None) -> tuple[int, Any]:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if tenant is not None:
        headers["X-Tenant"] = tenant
    async with client.request(method, path, json=body, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def stats(client: Client) -> dict[str, Any]:
    status, body = await call(client, "GET", "/_stats")
    assert status == 200
    return dict(body)


# ---------------------------------------------------------------- CRM


async def test_account_lookup_known_and_unknown(crm_client: Client) -> None:
    assert await call(crm_client, "GET", "/accounts/contoso.com") == (200, {
        "found": True, "domain": "contoso.com", "name": "Contoso Ltd", "industry": "software",
        "country": "US", "employees": 18500, "annual_revenue_usd": 4200000000,
        "tier": "enterprise"})
    assert await call(crm_client, "GET", "/accounts/gmail.com") == (200, {
        "found": False, "domain": "gmail.com", "name": None, "industry": "unknown",
        "country": None, "employees": 0, "annual_revenue_usd": 0, "tier": "none"})


@pytest.mark.parametrize("domain", ["Contoso.com", "nodot", "a.b", "x.c0m", "bad_domain.com"])
async def test_malformed_domain_is_400(crm_client: Client, domain: str) -> None:
    status, body = await call(crm_client, "GET", f"/accounts/{domain}")
    assert status == 400
    assert "not a valid domain" in body["error"]


async def test_score_lead_applies_once_per_key(crm_client: Client) -> None:
    first = await call(crm_client, "POST", "/leads/L-1/score", SCORE, key="k1")
    assert first == (200, {"lead_id": "L-1", "score": 82, "segment": "enterprise",
                           "owner": "ana", "applied": True, "version": 1})
    repeat = await call(crm_client, "POST", "/leads/L-1/score", {**SCORE, "score": 10},
                        key="k1")
    assert repeat == (200, {**first[1], "applied": False})  # the first application's result
    second = await call(crm_client, "POST", "/leads/L-1/score", {**SCORE, "score": 40},
                        key="k2")
    assert second[1]["applied"] is True
    assert second[1]["version"] == 2
    assert await call(crm_client, "GET", "/leads/L-1") == (200, {
        "lead_id": "L-1", "score": 40, "segment": "enterprise", "owner": "ana", "version": 2})
    counts = await stats(crm_client)
    assert (counts["applied"], counts["repeats"]) == (2, 1)


async def test_owner_is_optional(crm_client: Client) -> None:
    status, body = await call(crm_client, "POST", "/leads/L-2/score",
                              {"score": 0, "segment": "smb"}, key="k")
    assert status == 200
    assert body["owner"] is None


async def test_unknown_lead_is_404(crm_client: Client) -> None:
    status, body = await call(crm_client, "GET", "/leads/L-404")
    assert status == 404
    assert "L-404" in body["error"]


async def test_tenants_see_the_seed_data_and_only_their_own_writes(crm_client: Client) -> None:
    assert (await call(crm_client, "POST", "/leads/L-1/score", SCORE, key="k",
                       tenant="acme"))[0] == 200
    assert (await call(crm_client, "GET", "/leads/L-1", tenant="acme"))[0] == 200
    assert (await call(crm_client, "GET", "/leads/L-1", tenant="globex"))[0] == 404
    assert (await call(crm_client, "GET", "/leads/L-1"))[0] == 404  # tenant "default"
    # the same key in another tenant is another write
    other = await call(crm_client, "POST", "/leads/L-1/score", SCORE, key="k", tenant="globex")
    assert other[1]["applied"] is True
    assert other[1]["version"] == 1
    for tenant in ("acme", "globex", None):
        found = await call(crm_client, "GET", "/accounts/contoso.com", tenant=tenant)
        assert found[1]["found"] is True
    assert (await stats(crm_client))["by_tenant"] == {"acme": 3, "globex": 3, "default": 2}


@pytest.mark.parametrize("body", [
    {"score": 101, "segment": "smb"}, {"score": -1, "segment": "smb"}, {"score": 5},
    {"score": "high", "segment": "smb"}, {"score": 5, "segment": "smb", "extra": 1},
    {"score": 5, "segment": ""}, [1, 2], None])
async def test_invalid_score_body_is_400(crm_client: Client, body: Any) -> None:
    status, answer = await call(crm_client, "POST", "/leads/L-1/score", body, key="k")
    assert status == 400
    assert answer["error"].startswith("invalid request body")
    assert (await stats(crm_client))["applied"] == 0


@pytest.mark.parametrize(("key", "tenant", "message"), [
    (None, None, "Idempotency-Key"), ("has space", None, "Idempotency-Key"),
    ("k", "bad tenant!", "X-Tenant"), ("k", "", "X-Tenant")])
async def test_bad_headers_are_400(crm_client: Client, key: str | None, tenant: str | None,
                                   message: str) -> None:
    status, body = await call(crm_client, "POST", "/leads/L-1/score", SCORE, key=key,
                              tenant=tenant)
    assert status == 400
    assert message in body["error"]


async def test_unknown_route_and_method_answer_json(crm_client: Client) -> None:
    assert (await call(crm_client, "GET", "/nothing"))[0] == 404
    assert (await call(crm_client, "DELETE", "/accounts/contoso.com"))[0] == 405
    assert (await stats(crm_client))["calls"] == {}  # no handler was reached


# ---------------------------------------------------------------- ERP


async def test_vendor_lookup_known_and_unknown(erp_client: Client) -> None:
    assert await call(erp_client, "GET", "/vendors/V-1001") == (200, {
        "found": True, "vendor_id": "V-1001", "name": "Acme Office Supply",
        "status": "approved", "category": "office supplies", "country": "US",
        "payment_terms_days": 30})
    status, body = await call(erp_client, "GET", "/vendors/V-9999")
    assert status == 200
    assert (body["found"], body["status"], body["name"]) == (False, "unknown", None)


async def test_invoice_validation_rules(erp_client: Client) -> None:
    assert await call(erp_client, "POST", "/invoices/validate", INVOICE) == (
        200, {"valid": True, "problems": [], "line_count": 1})
    bad = {**INVOICE, "amount": "20000", "currency": "JPY", "due_date": "2024-04-01"}
    status, body = await call(erp_client, "POST", "/invoices/validate", bad)
    assert status == 200
    assert body["valid"] is False
    assert body["problems"] == ["currency JPY is not accepted",
                                "due date is before the invoice date",
                                "lines add up to 150.00, not 20000.00",
                                "a PO number is required from 10000"]


async def test_invoice_validation_is_a_read(erp_client: Client) -> None:
    for _ in range(2):  # no Idempotency-Key needed, nothing is written
        assert (await call(erp_client, "POST", "/invoices/validate", INVOICE))[0] == 200
    assert (await stats(erp_client))["applied"] == 0


async def test_invalid_invoice_is_400(erp_client: Client) -> None:
    status, body = await call(erp_client, "POST", "/invoices/validate",
                              {**INVOICE, "invoice_date": "yesterday"})
    assert status == 400
    assert "invoice_date" in body["error"]


async def test_approvals_apply_once_per_key_and_tenant(erp_client: Client) -> None:
    first = await call(erp_client, "POST", "/approvals", APPROVAL, key="a1")
    assert first == (200, {"approval_id": "APR-000001", "invoice_id": "INV-1",
                           "status": "recorded", "applied": True})
    assert await call(erp_client, "POST", "/approvals", APPROVAL, key="a1") == (
        200, {**first[1], "applied": False})
    second = await call(erp_client, "POST", "/approvals", {**APPROVAL, "decision": "hold"},
                        key="a2")
    assert (second[1]["approval_id"], second[1]["applied"]) == ("APR-000002", True)
    status, record = await call(erp_client, "GET", "/approvals/APR-000002")
    assert status == 200
    assert (record["decision"], record["amount"], record["note"]) == ("hold", "150", None)
    assert (await call(erp_client, "GET", "/approvals/APR-000002", tenant="t2"))[0] == 404
    assert (await stats(erp_client))["applied"] == 2


@pytest.mark.parametrize("change", [{"decision": "maybe"}, {"currency": "usd"},
                                    {"approver": ""}, {"amount": -1}, {"extra": True}])
async def test_invalid_approval_is_400(erp_client: Client, change: dict[str, Any]) -> None:
    status, _ = await call(erp_client, "POST", "/approvals", {**APPROVAL, **change}, key="k")
    assert status == 400


async def test_approval_needs_an_idempotency_key(erp_client: Client) -> None:
    status, body = await call(erp_client, "POST", "/approvals", APPROVAL)
    assert status == 400
    assert "Idempotency-Key" in body["error"]


# ---------------------------------------------------------------- faults, stats, reset


async def test_fault_until_cleared_applies_nothing(crm_client: Client) -> None:
    assert (await call(crm_client, "POST", "/_faults", {"status": 503}))[0] == 200
    for key in ("k1", "k2"):
        status, body = await call(crm_client, "POST", "/leads/L-1/score", SCORE, key=key)
        assert status == 503
        assert "injected fault" in body["error"]
    assert (await call(crm_client, "GET", "/healthz"))[0] == 200  # control routes: never
    assert (await call(crm_client, "DELETE", "/_faults"))[0] == 200
    assert (await call(crm_client, "POST", "/leads/L-1/score", SCORE, key="k1"))[1] == {
        **SCORE, "lead_id": "L-1", "version": 1, "applied": True}
    counts = await stats(crm_client)
    assert counts["calls"] == {"POST /leads/{lead_id}/score": 3}
    assert counts["statuses"] == {"503": 2, "200": 1}
    assert (counts["applied"], counts["repeats"]) == (1, 0)


async def test_fault_count_and_routes(erp_client: Client) -> None:
    spec = {"status": 429, "count": 2, "routes": ["POST /approvals"]}
    assert (await call(erp_client, "POST", "/_faults", spec))[0] == 200
    assert (await call(erp_client, "GET", "/vendors/V-1001"))[0] == 200  # another route
    statuses = [(await call(erp_client, "POST", "/approvals", APPROVAL, key="k"))[0]
                for _ in range(3)]
    assert statuses == [429, 429, 200]
    assert (await stats(erp_client))["statuses"] == {"200": 2, "429": 2}


async def test_fault_route_without_method_matches_every_method(crm_client: Client) -> None:
    spec = {"status": 500, "routes": ["/leads/{lead_id}"]}
    assert (await call(crm_client, "POST", "/_faults", spec))[0] == 200
    assert (await call(crm_client, "GET", "/leads/L-1"))[0] == 500
    assert (await call(crm_client, "GET", "/accounts/contoso.com"))[0] == 200


async def test_latency_fault(crm_client: Client) -> None:
    spec = {"status": None, "latency_ms": 300, "count": 1}
    assert (await call(crm_client, "POST", "/_faults", spec))[0] == 200
    started = time.monotonic()
    assert (await call(crm_client, "GET", "/accounts/contoso.com"))[0] == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert (await call(crm_client, "GET", "/accounts/contoso.com"))[0] == 200
    assert time.monotonic() - started < 0.3  # count 1: only the first was delayed


async def test_a_delayed_request_does_not_hold_others_back(crm_client: Client) -> None:
    spec = {"status": 504, "latency_ms": 400, "routes": ["GET /leads/{lead_id}"]}
    assert (await call(crm_client, "POST", "/_faults", spec))[0] == 200
    slow = asyncio.create_task(call(crm_client, "GET", "/leads/L-1"))
    started = time.monotonic()
    assert (await call(crm_client, "GET", "/accounts/contoso.com"))[0] == 200
    assert time.monotonic() - started < 0.4  # the service keeps serving meanwhile
    assert (await slow)[0] == 504


@pytest.mark.parametrize("spec", [{"status": 200}, {"count": 0}, {"latency_ms": -1},
                                  {"routes": ["GET /nope"]}, {"routes": []}, {"x": 1}])
async def test_invalid_fault_is_400(crm_client: Client, spec: dict[str, Any]) -> None:
    assert (await call(crm_client, "POST", "/_faults", spec))[0] == 400


async def test_reset_clears_writes_stats_and_faults(crm_client: Client) -> None:
    await call(crm_client, "POST", "/leads/L-1/score", SCORE, key="k1")
    await call(crm_client, "POST", "/_faults", {"status": 503, "routes": ["/healthz"]})
    await call(crm_client, "POST", "/_faults", {"status": 503, "count": 5})
    assert (await call(crm_client, "POST", "/_reset"))[0] == 200
    assert await stats(crm_client) == {"calls": {}, "statuses": {}, "applied": 0,
                                       "repeats": 0, "by_tenant": {}, "arrivals": {}}
    assert (await call(crm_client, "GET", "/leads/L-1"))[0] == 404  # no fault, no lead
    again = await call(crm_client, "POST", "/leads/L-1/score", SCORE, key="k1")
    assert again[1]["applied"] is True  # the key was forgotten too


async def test_serve_on_a_free_port_and_close() -> None:
    handle = await serve("crm", crm.create_app(), "127.0.0.1", 0)
    try:
        assert handle.port > 0
        assert handle.url == f"http://127.0.0.1:{handle.port}"
    finally:
        await handle.close()


def test_apps_are_built_fresh_each_time() -> None:
    assert crm.create_app() is not crm.create_app()
