"""CLI commands for runs waiting for a person: list, approve, reject."""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .cli_common import out, run
from .cli_common import settings as settings_
from .redaction import redact_value, terminal_text

if TYPE_CHECKING:
    from rich.table import Table

    from .approvals_ops import Decided, Request

__all__ = ["approvals_app"]

approvals_app = typer.Typer(
    no_args_is_help=True,
    help="List the runs waiting for a person (approval steps, tool calls that need "
         "approval, models that kept calling tools) and approve or reject them. A request "
         "nobody answers expires (AGENTFABRIC_APPROVAL_EXPIRY_S) and its run ends as "
         "expired.")

Target = Annotated[str, typer.Argument(
    help="The run id (or, when a run waits on more than one request, the hand-off id or "
         "its first 6+ characters).",
    show_default=False)]
By = Annotated[str | None, typer.Option("--by", help="Who decides (default: your user name).")]


def _me() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (some containers)
        return "cli"


def _when(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_row(request: Request, now: datetime) -> dict[str, Any]:
    hand_off = request.hand_off
    row: dict[str, Any] = hand_off.model_dump(mode="json",
                                              exclude={"envelope", "envelope_schema"})
    row["expires_at"] = _when(request.expires_at)
    row["state"] = request.state(now)
    decision = request.decision
    row["decision"] = None if decision is None else decision.model_dump(
        mode="json", include={"approved", "expired", "by", "note", "reason", "decided_at"})
    return row


def _table(requests: list[Request], now: datetime, *, show_state: bool) -> Table:
    from rich.table import Table

    plural = "s" if len(requests) != 1 else ""
    table = Table(title=f"{len(requests)} approval request{plural}"
                        f"{'' if show_state else ' pending'}",
                  caption="approve and reject take the run id (or the hand-off id, as "
                          "shown)" if requests else None)
    table.add_column("hand-off", no_wrap=True)
    table.add_column("run_id", no_wrap=True, min_width=36)
    table.add_column("workflow.step", overflow="fold")
    table.add_column("kind", overflow="fold")
    table.add_column("tool", overflow="fold")
    table.add_column("reason", min_width=16, ratio=1, overflow="fold")
    table.add_column("created", min_width=10)
    table.add_column("expires", min_width=10)
    if show_state:
        table.add_column("state", min_width=8, ratio=1, overflow="fold")
    for request in requests:
        h = request.hand_off
        row = [h.hand_off_id[:8], h.run_id, f"{h.workflow}.{h.step}", h.kind, h.tool or "-",
               h.reason, _short(h.created_at), _short(request.expires_at)]
        if show_state:
            state: str = request.state(now)
            if request.decision is not None and not request.decision.expired:
                what = request.decision.note or request.decision.reason
                state += f" by {request.decision.by}" + (f": {what}" if what else "")
            row.append(state)
        table.add_row(*(terminal_text(cell) for cell in row))  # payload-derived text
    return table


def _short(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


@approvals_app.command("list")
def approvals_list(
    workflow: Annotated[str | None, typer.Option("--workflow", "-w",
                                                 help="Only this workflow.")] = None,
    show_all: Annotated[bool, typer.Option(
        "--all", help="Also the decided and expired ones, with their state.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """List the pending approval requests: hand-off id, run, workflow, step, kind, tool,
    reason, when it was made and when it expires."""
    from schemas.models import utc_now

    from .approvals_ops import load_requests, select

    s = settings_()
    now = utc_now()
    chosen = select(run(load_requests(s)), workflow=workflow, include_decided=show_all,
                    now=now)
    if as_json:
        for request in chosen:
            print(json.dumps(redact_value(_json_row(request, now))))
        return
    out.print(_table(chosen, now, show_state=show_all))


def _report(decided: Decided, verb: str, then: str) -> None:
    h = decided.hand_off
    what = f"the call of tool {h.tool} in " if h.tool else ""
    out.print(f"{verb} {h.hand_off_id}: {what}run {h.run_id} ({h.workflow}, step {h.step}) "
              f"{then}", highlight=False)


@approvals_app.command("approve")
def approve(
    target: Target,
    note: Annotated[str, typer.Option("--note", "-n", help="A note kept on the run.")] = "",
    by: By = None,
) -> None:
    """Approve a run's pending request: the run goes on (a tool call that waited is made).
    Refused, exit 1, if it was decided already or has expired."""
    from .approvals_ops import decide

    decided = run(decide(settings_(), target, approved=True, by=by or _me(), note=note))
    then = ("runs its step again and makes the call" if decided.hand_off.tool
            else "goes on")
    _report(decided, "approved", then)


@approvals_app.command("reject")
def reject(
    target: Target,
    reason: Annotated[str, typer.Option("--reason", "-r",
                                        help="Why: kept on the run's result.")],
    by: By = None,
) -> None:
    """Reject a run's pending request: the run goes to the approval step's on_reject, or
    ends with status rejected and the reason as its output. Refused, exit 1, if it was
    decided already or has expired."""
    from .approvals_ops import decide

    if not reason.strip():
        raise typer.BadParameter("give the reason the run is rejected", param_hint="--reason")
    decided = run(decide(settings_(), target, approved=False, by=by or _me(),
                         reason=reason))
    _report(decided, "rejected", "ends as rejected (or goes to its step's on_reject)")
