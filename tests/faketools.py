"""The sample tools in-process, for unit tests: the same names, arguments and answers as the
shipped CRM/ERP catalog (tools/catalog), computed by the sample services' own logic
(services.crm, services.erp) without HTTP. Writes apply once per idempotency key, in memory.
Integration tests call the real services through the gateway instead."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.registry import ToolCall, ToolRegistry
from tools.services import crm, erp

__all__ = ["Clock", "SampleTools", "sample_tools"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountArgs(_Args):
    domain: str = Field(min_length=3, max_length=253, pattern=r"^[a-z0-9.-]+\.[a-z]{2,}$")


class LeadScoreArgs(_Args):
    lead_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    score: int = Field(ge=0, le=100)
    segment: str = Field(min_length=1, max_length=64)
    owner: str | None = None


class VendorArgs(_Args):
    vendor_id: str = Field(min_length=1, max_length=64)


class ApprovalArgs(_Args):
    invoice_id: str
    amount: float = Field(ge=0)
    currency: str
    approver: str
    decision: Literal["approve", "hold", "reject"]
    note: str | None = None


class SampleTools(ToolRegistry):
    """The registry, with the writes it applied (``applied``: idempotency key -> result)."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: dict[str, dict[str, Any]] = {}
        self.register("crm.get_account", AccountArgs)(self._account)
        self.register("crm.update_lead_score", LeadScoreArgs)(self._score)
        self.register("erp.get_vendor", VendorArgs)(self._vendor)
        self.register("erp.validate_invoice", erp.InvoiceArgs)(self._validate)
        self.register("erp.post_approval", ApprovalArgs)(self._approval)

    @staticmethod
    def _account(args: AccountArgs) -> dict[str, Any]:
        return crm.lookup_account(args.domain)

    @staticmethod
    def _vendor(args: VendorArgs) -> dict[str, Any]:
        return erp.lookup_vendor(args.vendor_id)

    @staticmethod
    def _validate(args: erp.InvoiceArgs) -> dict[str, Any]:
        return erp.validate_invoice(args)

    def _once(self, call: ToolCall, result: dict[str, Any]) -> dict[str, Any]:
        key = f"{call.tenant}:{call.tool}:{call.idempotency_key}"
        if key in self.applied:
            return {**self.applied[key], "applied": False}
        self.applied[key] = result
        return {**result, "applied": True}

    def _score(self, args: LeadScoreArgs, call: ToolCall) -> dict[str, Any]:
        return self._once(call, {"lead_id": args.lead_id, "score": args.score,
                                 "segment": args.segment, "owner": args.owner, "version": 1})

    def _approval(self, args: ApprovalArgs, call: ToolCall) -> dict[str, Any]:
        return self._once(call, {"approval_id": f"APR-{len(self.applied) + 1:06d}",
                                 "invoice_id": args.invoice_id, "status": "recorded"})


def sample_tools() -> SampleTools:
    return SampleTools()


class Clock:
    """A settable clock (seconds) for code that takes a ``clock`` callable."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
