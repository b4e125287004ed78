"""The sample ERP: the vendor master (seed data, the same for every tenant), invoice
validation (a read) and approval decisions (written per tenant, once per idempotency key).

Routes (plus the control routes of :mod:`services.common`)::

    GET  /vendors/{vendor_id}        the vendor record; status "unknown" for an unknown id
    POST /invoices/validate          {"valid", "problems", "line_count"}
    POST /approvals                  write: record an approve / hold / reject decision
    GET  /approvals/{approval_id}    a recorded decision, or 404
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from functools import cache
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from .common import (
    STATE,
    apply_once,
    create_service_app,
    idempotency_key,
    load_csv,
    parse_body,
    path_param,
    stored_record,
)

__all__ = ["ApprovalRequest", "InvoiceArgs", "create_app", "lookup_vendor", "validate_invoice"]

CURRENCIES = frozenset({"USD", "EUR", "GBP", "CHF", "CAD"})
PO_REQUIRED_FROM = Decimal("10000")
VENDOR_ID = re.compile(r"^.{1,64}$", re.DOTALL)
APPROVAL_ID = re.compile(r"^APR-[0-9]{6,}$")


class InvoiceLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    quantity: Decimal = Field(gt=0)
    unit_price: Decimal = Field(ge=0)


class InvoiceArgs(BaseModel):
    """Body of ``POST /invoices/validate``."""

    model_config = ConfigDict(extra="forbid")
    invoice_id: str = Field(min_length=1)
    amount: Decimal
    currency: str
    invoice_date: date
    due_date: date
    po_number: str | None = None
    lines: list[InvoiceLine] = Field(default_factory=list)


class ApprovalRequest(BaseModel):
    """Body of ``POST /approvals``."""

    model_config = ConfigDict(extra="forbid")
    invoice_id: str = Field(min_length=1, max_length=64)
    amount: Decimal = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    approver: str = Field(min_length=1, max_length=128)
    decision: Literal["approve", "hold", "reject"]
    note: str | None = Field(default=None, max_length=2000)


@cache
def _vendors() -> dict[str, dict[str, str]]:
    return {row["vendor_id"]: row for row in load_csv("vendors.csv")}


def lookup_vendor(vendor_id: str) -> dict[str, Any]:
    """The vendor master record; ``status`` is approved, new, blocked or unknown."""
    vendor = _vendors().get(vendor_id)
    if vendor is None:
        return {"found": False, "vendor_id": vendor_id, "name": None, "status": "unknown",
                "category": None, "country": None, "payment_terms_days": 0}
    return {"found": True, "vendor_id": vendor_id, "name": vendor["name"],
            "status": vendor["status"], "category": vendor["category"],
            "country": vendor["country"], "payment_terms_days": int(vendor["payment_terms_days"])}


def validate_invoice(args: InvoiceArgs) -> dict[str, Any]:
    """Check an invoice: lines add up, currency accepted, dates coherent, PO when large."""
    problems: list[str] = []
    if args.amount <= 0:
        problems.append("amount must be positive")
    if args.currency not in CURRENCIES:
        problems.append(f"currency {args.currency} is not accepted")
    if args.due_date < args.invoice_date:
        problems.append("due date is before the invoice date")
    if args.lines:
        total = sum((line.quantity * line.unit_price for line in args.lines), Decimal(0))
        if abs(total - args.amount) > Decimal("0.01"):
            problems.append(f"lines add up to {total:.2f}, not {args.amount:.2f}")
    if args.amount >= PO_REQUIRED_FROM and not args.po_number:
        problems.append(f"a PO number is required from {PO_REQUIRED_FROM}")
    return {"valid": not problems, "problems": problems, "line_count": len(args.lines)}


async def _get_vendor(request: web.Request) -> web.Response:
    vendor_id = path_param(request, "vendor_id", VENDOR_ID, "vendor id (1 to 64 characters)")
    return web.json_response(lookup_vendor(vendor_id))


async def _validate(request: web.Request) -> web.Response:
    return web.json_response(validate_invoice(await parse_body(request, InvoiceArgs)))


async def _record_approval(request: web.Request) -> web.Response:
    key = idempotency_key(request)
    body = await parse_body(request, ApprovalRequest)
    state = request.app[STATE]

    def apply(tenant: str) -> dict[str, Any]:
        approvals = state.table(tenant, "approvals")
        approval_id = f"APR-{len(approvals) + 1:06d}"
        approvals[approval_id] = {"approval_id": approval_id, **body.model_dump(mode="json"),
                                  "status": "recorded"}
        return {"approval_id": approval_id, "invoice_id": body.invoice_id, "status": "recorded"}

    return apply_once(request, key, apply)


async def _get_approval(request: web.Request) -> web.Response:
    return stored_record(request, "approvals", "approval_id", APPROVAL_ID,
                         "approval id (APR-000001)",
                         "no approval {id} is recorded in tenant {tenant}")


def _routes(app: web.Application) -> None:
    app.router.add_get("/vendors/{vendor_id}", _get_vendor)
    app.router.add_post("/invoices/validate", _validate)
    app.router.add_post("/approvals", _record_approval)
    app.router.add_get("/approvals/{approval_id}", _get_approval)


def create_app() -> web.Application:
    """A fresh ERP application with empty writes and statistics."""
    return create_service_app("erp", _routes)
