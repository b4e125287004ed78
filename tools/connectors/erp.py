"""Sample ERP connector: vendor master lookup and invoice validation."""

from __future__ import annotations

import csv
from datetime import date
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tools.registry import ToolRegistry

__all__ = ["InvoiceArgs", "VendorLookupArgs", "register"]

CURRENCIES = frozenset({"USD", "EUR", "GBP", "CHF", "CAD"})
PO_REQUIRED_FROM = Decimal("10000")


class VendorLookupArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vendor_id: str = Field(min_length=1, max_length=64)


class InvoiceLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    quantity: Decimal = Field(gt=0)
    unit_price: Decimal = Field(ge=0)


class InvoiceArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    invoice_id: str = Field(min_length=1)
    amount: Decimal
    currency: str
    invoice_date: date
    due_date: date
    po_number: str | None = None
    lines: list[InvoiceLine] = Field(default_factory=list)


@cache
def _vendors() -> dict[str, dict[str, Any]]:
    text = resources.files("tools").joinpath("data", "vendors.csv").read_text(encoding="utf-8")
    return {row["vendor_id"]: dict(row) for row in csv.DictReader(text.splitlines())}


def lookup_vendor(args: VendorLookupArgs) -> dict[str, Any]:
    """The vendor master record; ``status`` is approved, new, blocked or unknown."""
    vendor = _vendors().get(args.vendor_id)
    if vendor is None:
        return {"found": False, "vendor_id": args.vendor_id, "name": None, "status": "unknown",
                "category": None, "country": None, "payment_terms_days": 0}
    return {"found": True, "vendor_id": args.vendor_id, "name": vendor["name"],
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


def register(registry: ToolRegistry) -> None:
    registry.register("vendors.lookup", VendorLookupArgs)(lookup_vendor)
    registry.register("invoices.validate", InvoiceArgs)(validate_invoice)
