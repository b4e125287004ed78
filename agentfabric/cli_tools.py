"""CLI commands for the tool catalog: list the declared tools, import tools from OpenAPI."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .cli_common import err, out, run
from .cli_common import settings as settings_

if TYPE_CHECKING:
    from tools.gateway.spec import ToolSpec

    from .settings import Settings

__all__ = ["tools_app"]

tools_app = typer.Typer(no_args_is_help=True,
                        help="The tool catalog: what agents may call, with its policies.")


def _row(spec: ToolSpec, breaker_state: str) -> dict[str, Any]:
    where = "-"
    if spec.http is not None:
        where = f"{spec.http.method} {spec.http.service or spec.http.url}{spec.http.path}"
    elif spec.python is not None:
        where = f"python {spec.python}"
    fallback = "-"
    if spec.fallback is not None:
        fallback = spec.fallback.tool or f"answer {json.dumps(spec.fallback.answer)}"
    b = spec.breaker
    return {
        "name": spec.name, "access": spec.access, "scopes": ", ".join(spec.scopes) or "-",
        "rate_limit": spec.rate_limit.text if spec.rate_limit is not None else "-",
        "breaker": f"{b.failures} in {b.window_s:g}s, open {b.open_s:g}s",
        "breaker_state": breaker_state,
        "approval": spec.approval.when if spec.approval is not None else "-",
        "fallback": fallback, "implementation": where, "source": _short(spec.source),
    }


def _short(source: str) -> str:
    """A source path relative to the working folder when it is under it."""
    head, sep, tail = source.partition(" (")
    with contextlib.suppress(ValueError, OSError):
        head = str(Path(head).resolve().relative_to(Path.cwd()))
    return (head + sep + tail) or "-"


async def _breaker_states(settings: Settings) -> dict[str, str] | None:
    """Every tool's breaker state in Redis, or None when Redis is not reachable."""
    from agentfabric.errors import UnavailableError
    from streams.redispool import open_redis
    from tools.gateway.breaker import RedisBreakers
    from tools.gateway.pipeline import redis_prefix

    redis = open_redis(settings, socket_timeout=2, connect_timeout=1)
    try:
        states = await RedisBreakers(redis, prefix=redis_prefix(settings, "cb")).states()
        return {tool: str(state) for tool, state in states.items()}
    except UnavailableError:
        return None
    finally:
        await redis.aclose()


@tools_app.command("list")
def tools_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    no_state: Annotated[bool, typer.Option(
        "--no-state", help="Do not read breaker states from Redis.")] = False,
) -> None:
    """The declared tools: access, scopes, rate limit, breaker (and its current state, read
    from Redis when it is reachable), approval, fallback, where each is declared."""
    from tools.gateway.pipeline import load_catalog

    s = settings_()
    catalog = load_catalog(s)
    states = None if no_state else run(_breaker_states(s))
    if states is None and not no_state:
        err.print(f"Redis at {s.secret_free_redis_url} is not reachable: breaker states "
                  f"are not shown", highlight=False)
    rows = [_row(spec, "-" if no_state else "?" if states is None
                 else states.get(spec.name, "closed")) for spec in catalog.specs()]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    columns = ["name", "access", "scopes", "rate_limit", "breaker", "breaker_state",
               "approval", "fallback", "source"]
    for column in columns:
        table.add_column(column.replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    out.print(table)


@tools_app.command("import-openapi")
def tools_import_openapi(
    spec: Annotated[Path, typer.Argument(help="An OpenAPI 3 document (JSON or YAML).",
                                         show_default=False)],
    select: Annotated[list[str], typer.Option(
        "--select", "-s", help="An operationId to import (repeat for more).",
        show_default=False)],
    service: Annotated[str | None, typer.Option(
        "--service", help="The service the tools call (its URL comes from "
                          "AGENTFABRIC_SERVICE_URLS).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="...or an absolute base URL.")]
    = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the catalog YAML here (default: print it).")] = None,
) -> None:
    """Turn the selected operations of an OpenAPI document into catalog YAML (tools:
    [...]); review it, add policies (scopes, rate_limit, ...), and put it in a folder of
    AGENTFABRIC_TOOLS_DIRS."""
    from tools.gateway.openapi import catalog_yaml, import_operations, load_document

    specs = import_operations(load_document(spec), select, service=service, url=url,
                              source=str(spec))
    text = catalog_yaml(specs)
    if output is None:
        print(text, end="")
        return
    output.write_text(text, encoding="utf-8")
    out.print(f"wrote {len(specs)} tool(s) to {output}: {', '.join(s.name for s in specs)}",
              highlight=False)
