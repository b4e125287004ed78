"""``agentfabric mcp``: serve the loaded workflows as MCP tools (stdio or streamable HTTP)."""

from __future__ import annotations

from typing import Annotated

import typer

from .cli_common import err, run
from .cli_common import settings as settings_

__all__ = ["register"]


def mcp(
    http: Annotated[bool, typer.Option("--http", help="Serve streamable HTTP at "
                                                      "http://HOST:PORT/mcp instead of stdio.")]
    = False,
    host: Annotated[str, typer.Option(help="HTTP listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8765,
    tenant: Annotated[str, typer.Option(help="Tenant of runs whose call names none.")]
    = "default",
    timeout: Annotated[float, typer.Option(help="Seconds a tool call waits for its run's "
                                                "result; the run goes on after that.")] = 120.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING (logs go to stderr).")]
    = "WARNING",
) -> None:
    """Serve every workflow as an MCP tool (input schema from the workflow; a call runs it
    through Kafka and returns its output) and each run as the resource run://RUN_ID.
    A worker must be running. Default transport: stdio (for Claude Desktop and other
    MCP clients that start the server); --http for streamable HTTP."""
    from .app import setup_logging
    from .mcp_server import serve_http, serve_stdio

    setup_logging(log_level)
    s = settings_()
    if http:
        err.print(f"MCP (streamable HTTP) at http://{host}:{port}/mcp", highlight=False)
        run(serve_http(s, host=host, port=port, tenant=tenant, timeout_s=timeout))
    else:
        run(serve_stdio(s, tenant=tenant, timeout_s=timeout))


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
