"""CLI commands for the dead-letter topic: list, show, replay, purge."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from .cli_common import out, run
from .cli_common import settings as settings_
from .errors import ConfigError, PermanentError
from .redaction import redact_value, terminal_text

if TYPE_CHECKING:
    from schemas.models import DeadLetter

    from .dlq_ops import DeadLetterFilter, Marks, Replay, WorkflowTimeout
    from .settings import Settings

__all__ = ["dlq_app"]

dlq_app = typer.Typer(no_args_is_help=True, help="Inspect, replay and purge dead letters.")

Ids = Annotated[list[str] | None, typer.Argument(help="Dead-letter ids or unique id prefixes.",
                                                 show_default=False)]
Workflow = Annotated[str | None, typer.Option("--workflow", "-w", help="Only this workflow.")]
Step = Annotated[str | None, typer.Option("--step", "-s", help="Only this step.")]
Error = Annotated[str | None, typer.Option("--error", "-e",
                                           help="Only this error type, e.g. DecodeError.")]
Since = Annotated[str | None, typer.Option(
    "--since", help="Only those failed since: a duration (10m, 2h, 3d) or an ISO time (UTC "
                    "unless it has an offset).")]


def _filter(ids: list[str] | None, workflow: str | None, step: str | None, error: str | None,
            since: str | None) -> DeadLetterFilter:
    from .dlq_ops import DeadLetterFilter, parse_since

    return DeadLetterFilter(ids=tuple(ids or ()), workflow=workflow, step=step, error=error,
                            since=parse_since(since) if since else None)


def _json_row(letter: DeadLetter, marks: Marks, replayed_as: str | None) -> str:
    row = letter.model_dump(mode="json", exclude={"key", "value", "headers"})
    row["key"] = letter.key.decode("utf-8", "replace") if letter.key is not None else None
    row["purged"] = letter.dead_letter_id in marks.purged
    when = marks.replayed.get(letter.dead_letter_id)
    row["replayed_at"] = when.isoformat() if when is not None else None
    row["replayed_as"] = replayed_as
    return json.dumps(redact_value(row))  # payload-derived text, as the table shows it


@dlq_app.command("list")
def dlq_list(
    workflow: Workflow = None, step: Step = None, error: Error = None, since: Since = None,
    show_all: Annotated[bool, typer.Option("--all", help="Also the purged ones, marked.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """List dead letters (not the purged): id, when, error, where from, attempts, reason;
    marked if replayed."""
    from .dlq_ops import load, select, superseded
    from .tables import dead_letters_table

    s = settings_()
    spec = _filter(None, workflow, step, error, since)
    letters, marks = run(load(s))
    chosen = select(letters, spec, marks.purged, include_hidden=show_all)
    later = superseded(letters)
    if as_json:
        for letter in chosen.letters:
            print(_json_row(letter, marks, later.get(letter.dead_letter_id)))
        return
    out.print(dead_letters_table(chosen.letters, marks.purged, marks.replayed, later))
    if chosen.skipped:
        out.print(f"({chosen.skipped} purged not shown; --all shows them)")


@dlq_app.command("show")
def dlq_show(dead_letter_id: Annotated[str, typer.Argument(help="Id or unique id prefix.")],
             ) -> None:
    """Show one dead letter in full, with its original message decoded when it is an
    agentfabric message."""
    from .dlq_ops import load, select, superseded
    from .tables import describe_dead_letter

    s = settings_()
    letters, marks = run(load(s))
    spec = _filter([dead_letter_id], None, None, None, None)
    [letter] = select(letters, spec, marks.purged).letters
    ident = letter.dead_letter_id
    out.print(describe_dead_letter(letter, purged=ident in marks.purged,
                                   replayed=marks.replayed.get(ident),
                                   replayed_as=superseded(letters).get(ident)))


@dlq_app.command("replay")
def dlq_replay(
    ids: Ids = None, workflow: Workflow = None, step: Step = None, error: Error = None,
    since: Since = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be sent; send "
                                                            "nothing.")] = False,
) -> None:
    """Re-publish dead letters to the step or trigger topic they were read from, with the
    header af-replay-of: the worker runs each dead letter's replay once, and not at all if
    the run has since passed that step. Step messages start again at attempt 1 with a fresh
    deadline. Give ids, or filters (which skip purged and already replayed dead letters)."""
    from streams.topics import TopicNames

    from .dlq_ops import (
        Replay,
        Unreplayable,
        full_values,
        load,
        plan_replay,
        select,
        send_replays,
        superseded,
    )

    s = settings_()
    spec = _filter(ids, workflow, step, error, since)
    if not spec.ids and not spec.filtered:
        raise ConfigError("name the dead letters to replay: give ids, or at least one of "
                          "--workflow, --step, --error, --since (e.g. --since 30d for all)")
    letters, marks = run(load(s))
    chosen = select(letters, spec, marks.purged)
    later = superseded(letters)
    names = TopicNames(s.topic_prefix)
    timeout_of = _workflow_timeouts(s)
    replays: list[Replay] = []
    failed = skipped_replayed = 0
    todo = []
    for letter in chosen.letters:
        ident = letter.dead_letter_id
        if ident in later:
            failed += 1
            out.print(f"cannot replay {ident}: it was replayed and failed again as "
                      f"{later[ident]}; replay that one", highlight=False)
        elif ident in marks.replayed and not spec.ids:
            skipped_replayed += 1
        else:
            todo.append(letter)
    values = run(full_values(s, todo))
    for letter in todo:
        full = values.get(letter.dead_letter_id)
        plan = full if isinstance(full, Unreplayable) else plan_replay(
            letter, names, timeout_of, full_value=full)
        if isinstance(plan, Replay):
            replays.append(plan)
        else:
            failed += 1
            out.print(f"cannot replay {plan.dead_letter_id}: {terminal_text(plan.why)}",
                      highlight=False)

    def report(replay: Replay, refused: PermanentError | None) -> None:
        nonlocal failed
        if refused is not None:
            failed += 1
            out.print(f"cannot replay {replay.dead_letter_id}: {terminal_text(refused.reason)}",
                      highlight=False)
            return
        _print_replay(replay, "would replay" if dry_run else "replayed", marks)

    if dry_run:
        for replay in replays:
            report(replay, None)
    count = len(replays) if dry_run else run(send_replays(s, replays, report))
    extra = [f"{failed} cannot be replayed" if failed else "",
             f"{chosen.skipped} purged skipped" if chosen.skipped else "",
             f"{skipped_replayed} replayed before skipped (name them to send again)"
             if skipped_replayed else ""]
    detail = "; ".join(e for e in extra if e)
    out.print(f"{'dry run: would replay' if dry_run else 'replayed'} {count} dead "
              f"letter{'s' if count != 1 else ''}{f' ({detail})' if detail else ''}"
              f"{'; nothing was sent' if dry_run else ''}", highlight=False)
    if failed:
        raise typer.Exit(1)


def _print_replay(replay: Replay, verb: str, marks: Marks) -> None:
    key = replay.message.key.decode("utf-8", "replace") if replay.message.key else "-"
    what = f"run {replay.run}" if replay.run else f"key {key}"
    out.print(f"{verb} {replay.dead_letter_id} -> {replay.message.topic}  {terminal_text(what)}",
              highlight=False)
    before = marks.replayed.get(replay.dead_letter_id)
    if before is not None:
        out.print(f"  note: replayed before at {before.isoformat()}; the worker runs a dead "
                  f"letter's replay once, so this does nothing if that replay arrived",
                  highlight=False)
    if replay.note:
        out.print(f"  note: {terminal_text(replay.note)}", highlight=False)


def _workflow_timeouts(settings: Settings) -> WorkflowTimeout:
    """A workflow's timeout_s by (name, version); the workflows load on first use (only the
    workflow files: no models, tools or knowledge bases are needed for this)."""
    from agents.loader import load_workflows
    from agents.workflow import WorkflowSet

    loaded: WorkflowSet | None = None

    def timeout_of(name: str, version: int) -> float | None:
        nonlocal loaded
        if loaded is None:
            loaded = load_workflows(settings.workflows_dir)
        return loaded.get(name, version).timeout_s

    return timeout_of


@dlq_app.command("purge")
def dlq_purge(
    ids: Ids = None, workflow: Workflow = None, step: Step = None, error: Error = None,
    since: Since = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
    = False,
) -> None:
    """Hide dead letters from `dlq list` and from replay by filter. The dead-letter topic is
    append-only: the records stay on it until its retention removes them (set retention.ms
    on it to bound its size); purge marks them in Redis. Without ids or filters: all."""
    from streams.topics import TopicNames

    from .dlq_ops import load, mark_purged, select

    s = settings_()
    spec = _filter(ids, workflow, step, error, since)
    letters, marks = run(load(s))
    chosen = [d for d in select(letters, spec, marks.purged).letters
              if d.dead_letter_id not in marks.purged]
    if not chosen:
        out.print("nothing to purge: no dead letters match that are not purged already")
        return
    topic = TopicNames(s.topic_prefix).dlq
    plural = "s" if len(chosen) != 1 else ""
    if not yes:
        typer.confirm(f"Purge {len(chosen)} dead letter{plural}? They will no longer be listed "
                      f"or replayed by filter; their records stay on {topic} until its "
                      f"retention removes them", abort=True)
    count = run(mark_purged(s, (d.dead_letter_id for d in chosen)))
    out.print(f"purged {count} dead letter{'s' if count != 1 else ''} (the records stay on "
              f"{topic} until its retention removes them)", highlight=False)
