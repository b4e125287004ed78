"""The ``agentfabric`` command line."""

from __future__ import annotations

import asyncio
import enum
import gc
import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from .cli_agents import register as register_agent_commands
from .cli_approvals import approvals_app
from .cli_common import err, out, run
from .cli_common import settings as settings_
from .cli_dlq import dlq_app
from .cli_keys import keys_app
from .cli_ledger import register as register_ledger_commands
from .cli_mcp import register as register_mcp_command
from .cli_tools import tools_app
from .errors import AgentFabricError, ConfigError
from .logs import configure_logging
from .redaction import redact_value
from .settings import Settings

__all__ = ["app", "main"]

T = TypeVar("T")


class LogFormatOption(enum.Enum):
    json = "json"
    console = "console"


app = typer.Typer(
    name="agentfabric", no_args_is_help=True, add_completion=False,
    pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Event-driven agent workflows over Kafka.\n\n"
         "Business events arrive on trigger topics; YAML workflows run as stateless step "
         "consumers; results land on result topics and failures on a dead-letter topic.\n\n"
         "Quick start: `agentfabric demo`. Settings come from AGENTFABRIC_* environment "
         "variables (see `agentfabric settings`).")
topics_app = typer.Typer(no_args_is_help=True, help="Create and list the fabric's topics.")
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")
app.add_typer(tools_app, name="tools")
app.add_typer(approvals_app, name="approvals")
app.add_typer(keys_app, name="keys")


@app.command()
def up() -> None:
    """Start the embedded Kafka-compatible broker, Redis and the sample CRM and ERP services
    on loopback; print their settings."""
    from streams.embedded import EmbeddedStack

    s = settings_()
    stack = EmbeddedStack(s.state_dir, host=s.broker_host, broker_port=s.broker_port,
                          redis_port=s.redis_port, crm_port=s.crm_port, erp_port=s.erp_port)
    info = stack.start(services=True)
    out.print(f"broker  pid {info.broker.pid}  {info.bootstrap_servers}  (log {info.broker.log})")
    out.print(f"redis   pid {info.redis.pid}  {info.redis_url}  (log {info.redis.log})")
    for name, proc in info.services.items():
        out.print(f"{name:7} pid {proc.pid}  {info.service_urls[name]}  (log {proc.log})")
    out.print("\nConnection settings (the defaults already point here):")
    for key, value in info.env().items():
        print(f"export {key}={shlex.quote(value)}")
    out.print("\nStop them with `agentfabric down`.")


@app.command()
def down() -> None:
    """Stop exactly the broker, Redis and services that `agentfabric up` started."""
    from streams.embedded import EmbeddedStack

    s = settings_()
    stopped = EmbeddedStack(s.state_dir).stop()
    if not stopped:
        out.print(f"nothing to stop (no running stack recorded in {s.state_dir})")
    for proc in stopped:
        out.print(f"stopped {proc.name} (pid {proc.pid})")


@topics_app.command("apply")
def topics_apply() -> None:
    """Create every topic the loaded workflows need (partitions from AGENTFABRIC_PARTITIONS)."""
    from .app import build_engine, provision

    s = settings_()
    result = run(provision(s, build_engine(s)))
    for topic, state in sorted(result.items()):
        out.print(f"{state:8} {topic}")


@topics_app.command("list")
def topics_list() -> None:
    """List the topics the loaded workflows need, without touching the broker."""
    from streams.topics import TopicNames

    from .app import build_engine, required_topics

    s = settings_()
    for topic in required_topics(build_engine(s).workflows, TopicNames(s.topic_prefix),
                                 s.retry_tiers_s):
        print(topic)


@app.command()
def workflows() -> None:
    """Validate and list the loaded workflows."""
    from streams.topics import TopicNames

    from .app import build_engine
    from .tables import workflows_table

    s = settings_()
    out.print(workflows_table(build_engine(s).workflows, TopicNames(s.topic_prefix)))


@app.command()
def publish(
    topic: Annotated[str, typer.Argument(help="Trigger topic (af.triggers.crm) or its source "
                                              "(crm).")],
    file: Annotated[str, typer.Argument(help="JSON object, array or JSON lines; '-' for stdin.")],
) -> None:
    """Validate JSON events and publish them to a trigger topic (all or nothing)."""
    from .app import parse_events, publish_events, resolve_trigger_topic

    s = settings_()
    full_topic, source = resolve_trigger_topic(s, topic)
    text = sys.stdin.read() if file == "-" else _read(file)
    events = parse_events(text, source)
    count = run(publish_events(s, full_topic, events))
    out.print(f"published {count} event{'s' if count != 1 else ''} to {full_topic}")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


@app.command()
def results(
    workflow: Annotated[str, typer.Argument(help="Workflow name.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new results.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Print a workflow's results: a table, or JSON lines with --json (implied by --follow)."""
    from .app import read_results
    from .tables import results_table

    s = settings_()

    async def collect() -> list[Any]:
        rows = []
        async for result in read_results(s, workflow, follow=follow):
            if follow or as_json:  # payload-derived: secrets redacted, still valid JSON
                print(json.dumps(redact_value(result.model_dump(mode="json")),
                                 separators=(",", ":"), ensure_ascii=False), flush=True)
            else:
                rows.append(result)
        return rows

    try:
        rows = run(collect())
    except KeyboardInterrupt:
        return
    if not (follow or as_json):
        out.print(results_table(workflow, rows))


@app.command()
def worker(
    workflow: Annotated[list[str] | None, typer.Option(
        "--workflow", "-w", help="Run only this workflow's steps (repeatable).")] = None,
    router: Annotated[bool, typer.Option(help="Also route trigger events to workflows.")] = True,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on this port (0: off; default "
             "AGENTFABRIC_METRICS_PORT).")] = None,
    log_format: Annotated[LogFormatOption, typer.Option(
        help="json: one JSON object a line (for log shippers); console: for a person.")]
    = LogFormatOption.json,
) -> None:
    """Run step consumers (and the router) until SIGTERM/SIGINT; in-flight work finishes.
    Prometheus metrics are served at http://<metrics_host>:<metrics_port>/metrics."""
    from .app import build_engine, setup_logging
    from .worker import Worker

    setup_logging(log_level, "console" if log_format is LogFormatOption.console else "json")
    s = settings_(metrics_port=metrics_port)
    w = Worker(s, build_engine(s), workflows=workflow, router=router)
    # what start-up built (modules, workflows, clients) lives as long as the process: out
    # of the collector's way, so full collections stay short (bench d: p99 added per hop)
    gc.collect()
    gc.freeze()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(w.run(stop))
        await asyncio.wait([task, asyncio.create_task(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            try:
                await asyncio.wait_for(task, s.shutdown_timeout_s)
            except TimeoutError:
                raise AgentFabricError(
                    f"in-flight work did not finish within {s.shutdown_timeout_s:.0f}s "
                    f"(AGENTFABRIC_SHUTDOWN_TIMEOUT_S); its messages were not committed and "
                    f"will be redelivered") from None
        task.result()

    run(serve())


@app.command()
def ingress(
    host: Annotated[str | None, typer.Option(help="Listen address (default "
                                                  "AGENTFABRIC_INGRESS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default AGENTFABRIC_INGRESS_PORT).")]
    = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Serve the HTTP ingress: signed webhooks (POST /webhooks/{source}, sources from
    AGENTFABRIC_INGRESS_SOURCES_FILE), the run API, /healthz and /readyz, until SIGTERM."""
    from .app import setup_logging
    from .ingress.app import serve

    setup_logging(log_level)
    run(serve(settings_(), host, port))


@app.command()
def demo(keep: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
         ) -> None:
    """The main job: start the embedded stack, provision topics, run workers, publish sample
    CRM and ERP events, print the results, and stop everything."""
    from .demo import run_demo

    raise typer.Exit(run(run_demo(settings_(), out, keep=keep)))


@app.command("settings")
def showsettings_() -> None:
    """Print every setting with its current value and its environment variable."""
    s = settings_()
    shown = s.model_dump(mode="json")  # secrets come out masked
    for name, field in Settings.model_fields.items():
        value = s.secret_free_redis_url if name == "redis_url" else shown[name]
        # in the form the variable takes: JSON for lists and objects, empty when unset
        text = (json.dumps(value) if isinstance(value, list | dict)
                else json.dumps("" if value is None else str(value))[1:-1])
        print(f"AGENTFABRIC_{name.upper()}={text}"
              f"    # {field.description or ''}".rstrip(" #"))


register_agent_commands(app)
register_mcp_command(app)
register_ledger_commands(app)


def main() -> None:
    # one-shot commands report failures as one error line, their warnings as console lines
    # (redacted like every log line); `worker`, `ingress` and `mcp` log JSON lines in full
    configure_logging(logging.WARNING, "console")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        app()
    except ConfigError as exc:  # escaped: messages name extras like agentfabric[local]
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except AgentFabricError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(1)
