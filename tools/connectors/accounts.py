"""Sample CRM connector: look a company up by its e-mail domain in a shipped account table."""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tools.registry import ToolRegistry

__all__ = ["AccountLookupArgs", "register"]


class AccountLookupArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    domain: str = Field(min_length=3, max_length=253, pattern=r"^[a-z0-9.-]+\.[a-z]{2,}$")


@cache
def _accounts() -> dict[str, dict[str, Any]]:
    text = resources.files("tools").joinpath("data", "accounts.csv").read_text(encoding="utf-8")
    table: dict[str, dict[str, Any]] = {}
    for row in csv.DictReader(text.splitlines()):
        table[row["domain"]] = {
            "name": row["name"], "industry": row["industry"], "country": row["country"],
            "employees": int(row["employees"]),
            "annual_revenue_usd": int(row["annual_revenue_usd"]), "tier": row["tier"],
        }
    return table


def lookup_account(args: AccountLookupArgs) -> dict[str, Any]:
    """Firmographics for a domain; ``found`` is false for unknown and free-mail domains."""
    account = _accounts().get(args.domain)
    if account is None:
        return {"found": False, "domain": args.domain, "name": None, "industry": "unknown",
                "country": None, "employees": 0, "annual_revenue_usd": 0, "tier": "none"}
    return {"found": True, "domain": args.domain, **account}


def register(registry: ToolRegistry) -> None:
    registry.register("accounts.lookup", AccountLookupArgs)(lookup_account)
