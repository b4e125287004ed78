"""The sample CRM: company accounts by e-mail domain (seed data, the same for every tenant)
and lead scores (written per tenant, once per idempotency key).

Routes (plus the control routes of :mod:`services.common`)::

    GET  /accounts/{domain}        firmographics; found false for an unknown domain
    POST /leads/{lead_id}/score    write: {"score": 0..100, "segment", "owner"?}
    GET  /leads/{lead_id}          the lead's current score record, or 404
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

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

__all__ = ["LeadScore", "create_app", "lookup_account"]

DOMAIN = re.compile(r"^(?=.{3,253}$)[a-z0-9.-]+\.[a-z]{2,}$")  # as tools' accounts.lookup
LEAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class LeadScore(BaseModel):
    """Body of ``POST /leads/{lead_id}/score``."""

    model_config = ConfigDict(extra="forbid")
    score: int = Field(ge=0, le=100)
    segment: str = Field(min_length=1, max_length=64)
    owner: str | None = Field(default=None, min_length=1, max_length=128)


@cache
def _accounts() -> dict[str, dict[str, Any]]:
    return {row["domain"]: {
        "name": row["name"], "industry": row["industry"], "country": row["country"],
        "employees": int(row["employees"]),
        "annual_revenue_usd": int(row["annual_revenue_usd"]), "tier": row["tier"],
    } for row in load_csv("accounts.csv")}


def lookup_account(domain: str) -> dict[str, Any]:
    """Firmographics for ``domain``; ``found`` is false for unknown and free-mail domains."""
    account = _accounts().get(domain)
    if account is None:
        return {"found": False, "domain": domain, "name": None, "industry": "unknown",
                "country": None, "employees": 0, "annual_revenue_usd": 0, "tier": "none"}
    return {"found": True, "domain": domain, **account}


async def _get_account(request: web.Request) -> web.Response:
    domain = path_param(request, "domain", DOMAIN, "domain (lower-case, like example.com)")
    return web.json_response(lookup_account(domain))


async def _score_lead(request: web.Request) -> web.Response:
    lead_id = path_param(request, "lead_id", LEAD_ID, "lead id")
    key = idempotency_key(request)
    body = await parse_body(request, LeadScore)
    state = request.app[STATE]

    def apply(tenant: str) -> dict[str, Any]:
        leads = state.table(tenant, "leads")
        version = leads[lead_id]["version"] + 1 if lead_id in leads else 1
        leads[lead_id] = {"lead_id": lead_id, **body.model_dump(), "version": version}
        return dict(leads[lead_id])

    return apply_once(request, key, apply)


async def _get_lead(request: web.Request) -> web.Response:
    return stored_record(request, "leads", "lead_id", LEAD_ID, "lead id",
                         "no lead {id} has been scored in tenant {tenant}")


def _routes(app: web.Application) -> None:
    app.router.add_get("/accounts/{domain}", _get_account)
    app.router.add_post("/leads/{lead_id}/score", _score_lead)
    app.router.add_get("/leads/{lead_id}", _get_lead)


def create_app() -> web.Application:
    """A fresh CRM application with empty writes and statistics."""
    return create_service_app("crm", _routes)
