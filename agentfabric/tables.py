"""Rich renderings of workflows, results and dead letters for the CLI."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence, Set
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from agentfabric.errors import PermanentError
from agentfabric.redaction import redact, redact_value, strip_control, terminal_text
from agents.evals import EvalReport
from agents.workflow import WorkflowSet
from schemas.models import AvroModel, DeadLetter, RunResult, StepMessage, TriggerEvent
from schemas.serde import SCHEMA_HEADER, decode, header_value
from streams.dlq import replay_of
from streams.topics import TopicNames

__all__ = ["dead_letters_table", "describe_dead_letter", "eval_table", "results_table",
           "workflows_table"]

MAX_OUTPUT_COLUMNS = 7


def _cell(value: Any) -> str:
    """A payload-derived value as a table cell: redacted, without control sequences, its rich
    markup escaped (agentfabric.redaction.terminal_text)."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return terminal_text(json.dumps(redact_value(value), separators=(",", ":")))
    return terminal_text(value)


def workflows_table(workflows: WorkflowSet, names: TopicNames) -> Table:
    table = Table(title="Workflows")
    for column in ("workflow", "version", "trigger", "steps", "file"):
        table.add_column(column)
    for wf in workflows:
        trigger = f"{names.trigger(wf.trigger.source)} ({', '.join(wf.trigger.event_types)})"
        table.add_row(wf.name, str(wf.version), trigger,
                      " → ".join(f"{s.id}[{s.kind}]" for s in wf.steps), wf.file)
    return table


def results_table(workflow: str, results: Sequence[RunResult]) -> Table:
    keys: list[str] = []
    for result in results:
        if isinstance(result.output, dict):
            keys.extend(k for k in result.output if k not in keys)
    keys = keys[:MAX_OUTPUT_COLUMNS]
    table = Table(title=f"{workflow}: {len(results)} result{'s' if len(results) != 1 else ''}")
    table.add_column("run", no_wrap=True, min_width=8)
    table.add_column("event", no_wrap=True, min_width=12)
    for key in keys or ["output"]:
        table.add_column(_cell(key), no_wrap=True, overflow="ellipsis", max_width=28)
    table.add_column("steps", justify="right", min_width=5, no_wrap=True)
    table.add_column("ms", justify="right", min_width=5, no_wrap=True)
    for r in results:
        output = redact_value(r.output)  # a credential-named field masked whole
        values = ([_cell(output.get(k)) for k in keys] if keys and isinstance(output, dict)
                  else [_cell(output)])
        elapsed = (r.finished_at - r.started_at).total_seconds() * 1000
        table.add_row(_cell(r.run_id[:8]), _cell(r.event_id), *values, str(len(r.path)),
                      f"{elapsed:.0f}")
    return table


def eval_table(report: EvalReport) -> Table:
    table = Table(title=f"eval {report.workflow}: {sum(c.passed for c in report.cases)}/"
                        f"{len(report.cases)} passed")
    for column in ("case", "result", "ms", "tokens", "cost $", "failures"):
        table.add_column(column, overflow="fold")
    for c in report.cases:
        table.add_row(_cell(c.name), "pass" if c.passed else "[red]FAIL[/red]",
                      "-" if c.latency_ms is None else f"{c.latency_ms:.0f}",
                      str(c.input_tokens + c.output_tokens), f"{c.cost_usd:.6f}",
                      _cell("; ".join(c.failures)))
    return table


def dead_letters_table(letters: Sequence[DeadLetter], purged: Set[str] = frozenset(),
                       replayed: Mapping[str, datetime] | None = None,
                       replayed_as: Mapping[str, str] | None = None) -> Table:
    """One row per dead letter, marked if purged, replayed (``replayed``: id -> when), or
    replayed and failed again (``replayed_as``: id -> the id of that later dead letter)."""
    replayed, replayed_as = replayed or {}, replayed_as or {}
    shown = f"Dead letters: {len(letters)}"
    marked = sum(d.dead_letter_id in purged for d in letters)
    table = Table(title=f"{shown} ({marked} purged)" if marked else shown)
    for column in ("id", "failed at", "error", "kind", "from", "run", "tries", "reason"):
        table.add_column(column, overflow="fold")
    for d in letters:
        where = _cell(f"{d.topic}[{d.partition}]@{d.offset}")
        run = _cell(f"{d.workflow}.{d.step}") if d.workflow else "-"
        table.add_row(_marked_id(d.dead_letter_id, purged, replayed, replayed_as),
                      d.failed_at.strftime("%Y-%m-%d %H:%M:%S"), _cell(d.error_type),
                      "transient" if d.transient else "permanent", where, run,
                      str(d.attempts), _cell(d.reason))
    return table


def _marked_id(ident: str, purged: Set[str], replayed: Mapping[str, datetime],
               replayed_as: Mapping[str, str]) -> str:
    marks = ["purged"] if ident in purged else []
    if ident in replayed_as:
        marks.append(f"replayed, failed again: {replayed_as[ident][:8]}")
    elif ident in replayed:
        marks.append("replayed")
    return f"{ident[:8]} ({'; '.join(marks)})" if marks else ident[:8]


def _original(d: DeadLetter) -> str:
    if d.value is None:
        return "(no value)"
    headers = [(h.key, h.value) for h in d.headers]
    schema = header_value(headers, SCHEMA_HEADER) or b""
    models: dict[bytes, type[AvroModel]] = {b"step_message": StepMessage,
                                            b"trigger_event": TriggerEvent}
    model = models.get(schema.rsplit(b".v", 1)[0])
    if model is not None:
        with contextlib.suppress(PermanentError):  # undecodable: shown raw below
            return decode(d.value, headers, model).model_dump_json(indent=2)
    try:
        return d.value.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(d.value)} bytes, not UTF-8) {d.value[:64].hex()}"


def _when(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


def describe_dead_letter(d: DeadLetter, *, purged: bool = False,
                         replayed: datetime | None = None,
                         replayed_as: str | None = None) -> Group:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    kind = ("transient: its attempts ran out" if d.transient
            else "permanent: retrying could not help")
    rows = [("id", d.dead_letter_id + ("  (purged)" if purged else "")),
            ("reason", d.reason), ("error", f"{d.error_type} ({kind})"),
            ("from", f"{d.topic} partition {d.partition} offset {d.offset}"),
            ("record time", _when(d.record_timestamp)),
            ("group", d.consumer_group), ("attempts", str(d.attempts)),
            ("first failed", _when(d.first_failed_at)), ("failed at", _when(d.failed_at)),
            ("run", d.run_id or "-"), ("workflow", d.workflow or "-"), ("step", d.step or "-"),
            ("tenant", d.tenant or "-"), ("trace", d.trace_parent or "-"),
            ("key", d.key.decode("utf-8", "replace") if d.key else "-"),
            ("headers", ", ".join(f"{h.key}={(h.value or b'').decode('utf-8', 'replace')}"
                                  for h in d.headers) or "-")]
    if (origin := replay_of(d)) is not None:
        rows.append(("replay of", origin))
    if replayed is not None:
        rows.append(("replayed", _when(replayed)))
    if replayed_as is not None:
        rows.append(("replay failed", f"again, as {replayed_as}; replay that one"))
    for label, value in rows:
        table.add_row(label, _cell(value))
    # a Text is never read as markup; secrets and control sequences still go
    return Group(table, Text("\noriginal message:", style="bold"),
                 Text(strip_control(redact(_original(d)))))
