"""Event generators with independently computed expected outcomes, and a running fabric."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from agentfabric.app import build_engine, provision, publish_events
from agentfabric.settings import Settings
from agentfabric.worker import Worker, background_worker
from agents.engine import run_id_for
from schemas.models import DeadLetter, RunResult, TriggerEvent
from streams.reader import read_until
from streams.topics import TopicNames

# (domain, employees, industry) from tools/services/data/accounts.csv, restated here as the oracle
ACCOUNTS = {
    "contoso.com": (18500, "software"), "woodgrovebank.com": (12400, "financial services"),
    "meridian-foods.com": (2300, "food and beverage"), "cobalt-analytics.io": (45, "software"),
    "litware.com": (260, "software"), "munsonspickles.com": (25, "food and beverage"),
    "tailspintoys.com": (85, "retail"), "harbor-health.org": (4700, "healthcare"),
}
FREE_MAIL = ["gmail.com", "outlook.com"]
TITLES = {"VP Sales": 30, "Chief Executive Officer": 30, "Director of IT": 15,
          "Office Manager": 15, "Analyst": 0, "Intern": 0}
VENDORS = {"V-1001": "approved", "V-1005": "approved", "V-1008": "new", "V-1010": "blocked",
           "V-9999": "unknown"}


@dataclass(frozen=True)
class Case:
    event: TriggerEvent
    workflow: str
    expected: dict[str, Any]

    @property
    def run_id(self) -> str:
        return run_id_for(self.event, self.workflow)


def lead_case(i: int, rng: random.Random) -> Case:
    domain = rng.choice([*ACCOUNTS, *FREE_MAIL])
    title = rng.choice(list(TITLES))
    demo = rng.random() < 0.3
    employees, industry = ACCOUNTS.get(domain, (0, "unknown"))
    size = 40 if employees >= 1000 else 25 if employees >= 200 else 10 if employees >= 20 else 0
    fit = {"software", "financial services", "manufacturing", "healthcare"}
    ind = 20 if industry in fit else 5 if domain in ACCOUNTS else 0
    score = size + TITLES[title] + ind + (10 if demo else 0)
    segment = "hot" if score >= 70 else "warm" if score >= 40 else "nurture"
    event = TriggerEvent(event_id=f"lead-{i}", source="crm", event_type="lead.created",
                         tenant="acme", payload={
                             "lead_id": f"L-{i}", "email": f"  Person{i}@{domain.upper()} ",
                             "first_name": "Pat", "last_name": f"N{i}", "title": title,
                             "requested_demo": demo})
    return Case(event, "lead_enrichment", {"lead_id": f"L-{i}", "score": score,
                                           "segment": segment,
                                           "email": f"person{i}@{domain}"})


def invoice_case(i: int, rng: random.Random) -> Case:
    vendor = rng.choice(list(VENDORS))
    amount = rng.choice([450, 2500, 9999.99, 12000, 50000, 75000])
    po = rng.random() < 0.7
    problems = amount >= 10000 and not po
    status = VENDORS[vendor]
    if problems:
        queue = "ap-exceptions"
    elif status in ("blocked", "unknown"):
        queue = "vendor-compliance"
    elif amount >= 50000:
        queue = "cfo-approval"
    elif amount >= 10000 or status == "new":
        queue = "controller-approval"
    else:
        queue = "auto-pay"
    payload: dict[str, Any] = {"invoice_id": f"INV-{i}", "vendor_id": vendor, "amount": amount,
                               "currency": "USD", "invoice_date": "2026-11-01",
                               "due_date": "2026-12-01"}
    if po:
        payload["po_number"] = f"PO-{i}"
    event = TriggerEvent(event_id=f"inv-{i}", source="erp", event_type="invoice.posted",
                         tenant="acme", payload=payload)
    return Case(event, "invoice_triage", {"invoice_id": f"INV-{i}", "queue": queue,
                                          "valid": not problems})


def cases(n: int, seed: int = 7, first_id: int = 0) -> list[Case]:
    rng = random.Random(seed)
    return [lead_case(i, rng) if i % 2 == 0 else invoice_case(i, rng)
            for i in range(first_id, first_id + n)]


async def publish_cases(settings: Settings, batch: list[Case]) -> None:
    names = TopicNames(settings.topic_prefix)
    for source in ("crm", "erp"):
        events = [c.event for c in batch if c.event.source == source]
        if events:
            await publish_events(settings, names.trigger(source), events)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Provision topics and run an in-process worker until the block exits."""
    engine = build_engine(settings)
    await provision(settings, engine)
    async with background_worker(settings, engine) as worker:
        yield worker


async def collect_results(settings: Settings, workflow: str, count: int,
                          within: float = 60) -> list[RunResult]:
    """Read the result topic until ``count`` distinct runs are there (all records kept)."""
    return await read_until(settings, TopicNames(settings.topic_prefix).results(workflow),
                            RunResult, lambda found: len({r.run_id for r in found}) >= count,
                            within=within)


async def collect_dead_letters(settings: Settings, count: int,
                               within: float = 30) -> list[DeadLetter]:
    return await read_until(settings, TopicNames(settings.topic_prefix).dlq, DeadLetter,
                            lambda found: len(found) >= count, within=within)


def check_results(batch: list[Case], results: list[RunResult]) -> None:
    """Every case has exactly one result and its output matches the oracle."""
    by_run = {}
    for result in results:
        assert result.run_id not in by_run, f"duplicate result for {result.event_id}"
        by_run[result.run_id] = result
    missing = [c.event.event_id for c in batch if c.run_id not in by_run]
    assert not missing, f"{len(missing)} runs without a result: {missing[:10]}"
    assert len(by_run) == len(batch)
    for case in batch:
        output = by_run[case.run_id].output
        for key, value in case.expected.items():
            assert output[key] == value, (case.event.event_id, key, output)
