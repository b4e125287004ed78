"""CLI commands over the run ledger: ``runs show``, ``runs list`` and ``usage``
(``agentfabric.ledger`` folds the run events these read)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

import typer
from rich.table import Table

from schemas.models import RunEvent

from .cli_agents import runs_app
from .cli_common import out, run
from .cli_common import settings as settings_
from .errors import ConfigError
from .ledger import RunLedger, RunSummary, UsageRow, event_json, parse_since
from .redaction import terminal_text

__all__ = ["register"]

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    """Add ``usage`` to the main app (``runs show|list`` join the ``runs`` sub-app)."""
    app.command("usage")(usage)


def _with_ledger(use: Callable[[RunLedger], Awaitable[T]]) -> T:
    from streams.redispool import open_redis

    s = settings_()

    async def go() -> T:
        redis = open_redis(s)
        try:
            return await use(RunLedger(redis, s.topic_prefix))
        finally:
            await redis.aclose()

    return run(go())


def _when(ms: int | datetime) -> str:
    when = ms if isinstance(ms, datetime) else datetime.fromtimestamp(ms / 1000, UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="The run id.")],
              as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False) -> None:
    """The run's timeline from the ledger: one row per processed step, and the totals."""

    async def load(ledger: RunLedger) -> tuple[RunSummary | None, list[RunEvent]]:
        return await ledger.summary(run_id), await ledger.steps(run_id)

    summary, events = _with_ledger(load)
    if summary is None:
        raise ConfigError(f"no run {run_id} in the ledger; is a worker running (it folds the "
                          f"run events), and is AGENTFABRIC_TOPIC_PREFIX the workers' prefix?")
    if as_json:
        print(json.dumps({"run_id": run_id, "workflow": summary.workflow,
                          "status": summary.status, "totals": summary.totals.model_dump(),
                          "steps": [event_json(e) for e in events]}))
        return
    table = Table(title=f"run {run_id} ({summary.workflow}, {summary.tenant}): "
                        f"{summary.status}")
    for column in ("step", "attempt", "outcome", "started", "latency ms", "tokens in",
                   "tokens out", "cost $", "tool calls"):
        table.add_column(column, justify="left" if column in ("step", "outcome", "started")
                         else "right")
    latency = 0.0
    for e in events:
        latency += e.latency_ms
        table.add_row(e.step, str(e.attempt), e.outcome, _when(e.started_at),
                      f"{e.latency_ms:.1f}", str(e.input_tokens), str(e.output_tokens),
                      f"{e.cost_usd:.6f}", str(e.tool_calls))
    t = summary.totals
    table.add_section()
    table.add_row("total", "", f"{t.steps} steps", _when(summary.started_ms), f"{latency:.1f}",
                  str(t.input_tokens), str(t.output_tokens), f"{t.cost_usd:.6f}",
                  str(t.tool_calls))
    out.print(table)
    out.print(f"wall time {summary.finished_ms - summary.started_ms} ms (steps plus the hops "
              f"between them)")
    for e in events:
        if e.error:  # failed attempts: retried, or dead-lettered
            out.print(f"{terminal_text(e.step)} attempt {e.attempt} ({e.outcome}): "
                      f"{terminal_text(e.error)}")


@runs_app.command("list")
def runs_list(
    workflow: Annotated[str | None, typer.Option(help="Only this workflow.")] = None,
    status: Annotated[str | None, typer.Option(help="Only this status: running, "
                                                    "handed_off, completed, ...")] = None,
    since: Annotated[str | None, typer.Option(help="Active since: 30m, 1h, 7d or an ISO "
                                                   "time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Runs from the ledger, most recently active first."""
    since_ms = parse_since(since) if since else None

    async def load(ledger: RunLedger) -> list[RunSummary]:
        return await ledger.runs(workflow=workflow, status=status, since_ms=since_ms,
                                 limit=limit)

    runs = _with_ledger(load)
    if as_json:
        for r in runs:
            print(json.dumps({"run_id": r.run_id, "workflow": r.workflow, "tenant": r.tenant,
                              "status": r.status, "started_ms": r.started_ms,
                              "finished_ms": r.finished_ms, "totals": r.totals.model_dump()}))
        return
    table = Table(title=f"runs: {len(runs)}")
    for column in ("run", "workflow", "tenant", "status", "started", "ms", "steps", "tokens",
                   "cost $"):
        table.add_column(column)
    for r in runs:
        table.add_row(r.run_id, r.workflow, r.tenant, r.status, _when(r.started_ms),
                      str(r.finished_ms - r.started_ms), str(r.totals.steps),
                      str(r.totals.input_tokens + r.totals.output_tokens),
                      f"{r.totals.cost_usd:.6f}")
    out.print(table)


def usage(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    since: Annotated[str, typer.Option(help="From: 30m, 1h, 7d or an ISO time (counted in "
                                            "whole hours).")] = "24h",
    by: Annotated[str, typer.Option(help="Group by workflow or step.")] = "workflow",
    as_json: Annotated[bool, typer.Option("--json", help="JSON.")] = False,
) -> None:
    """Tokens, cost and tool calls per tenant and workflow (or step) from the ledger, with
    the cost burn per hour over the window."""
    if by not in ("workflow", "step"):
        raise ConfigError(f"--by {by}: give workflow or step")
    grouping: Literal["workflow", "step"] = "step" if by == "step" else "workflow"
    since_ms = parse_since(since)

    async def load(ledger: RunLedger) -> tuple[list[UsageRow], int]:
        return await ledger.usage(since_ms=since_ms, tenant=tenant, by=grouping)

    rows, hours = _with_ledger(load)
    cost = round(sum(r.usage.cost_usd for r in rows), 10)
    if as_json:
        print(json.dumps({"since_ms": since_ms, "hours": hours, "cost_usd": cost,
                          "burn_usd_per_hour": cost / hours,
                          "rows": [{"tenant": r.tenant, "workflow": r.workflow, "step": r.step,
                                    **r.usage.model_dump()} for r in rows]}))
        return
    table = Table(title=f"usage since {_when(since_ms)} ({hours} h)")
    for column in ("tenant", "workflow", *(("step",) if grouping == "step" else ()), "steps",
                   "tokens in", "tokens out", "tool calls", "cost $"):
        table.add_column(column)
    for r in rows:
        u = r.usage
        table.add_row(r.tenant, r.workflow, *((r.step,) if grouping == "step" else ()),
                      str(u.steps), str(u.input_tokens), str(u.output_tokens),
                      str(u.tool_calls), f"{u.cost_usd:.6f}")
    out.print(table)
    out.print(f"total cost ${cost:.6f}; burn ${cost / hours:.6f}/h over {hours} h")
