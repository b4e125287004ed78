"""The ``agentfabric`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from .errors import AgentFabricError, ConfigError
from .settings import Settings, load_settings

__all__ = ["app", "main"]

T = TypeVar("T")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="agentfabric", no_args_is_help=True, add_completion=False,
    pretty_exceptions_enable=False,
    help="Event-driven agent workflows over Kafka.\n\n"
         "Business events arrive on trigger topics; YAML workflows run as stateless step "
         "consumers; results land on result topics and failures on a dead-letter topic.\n\n"
         "Quick start: `agentfabric demo`. Settings come from AGENTFABRIC_* environment "
         "variables (see `agentfabric settings`).")
kb_app = typer.Typer(no_args_is_help=True, help="Knowledge bases: ingest and search.")
runs_app = typer.Typer(no_args_is_help=True, help="Recorded runs: replay them.")
topics_app = typer.Typer(no_args_is_help=True, help="Create and list the fabric's topics.")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect the dead-letter topic.")
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")
app.add_typer(runs_app, name="runs")
app.add_typer(kb_app, name="kb")


def _settings(**overrides: Any) -> Settings:
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@app.command()
def up() -> None:
    """Start the embedded Kafka-compatible broker and Redis on loopback; print their settings."""
    from streams.embedded import EmbeddedStack

    s = _settings()
    stack = EmbeddedStack(s.state_dir, host=s.broker_host, broker_port=s.broker_port,
                          redis_port=s.redis_port)
    info = stack.start()
    out.print(f"broker  pid {info.broker.pid}  {info.bootstrap_servers}  (log {info.broker.log})")
    out.print(f"redis   pid {info.redis.pid}  {info.redis_url}  (log {info.redis.log})")
    out.print("\nConnection settings (the defaults already point here):")
    for key, value in info.env().items():
        print(f"export {key}={value}")
    out.print("\nStop them with `agentfabric down`.")


@app.command()
def down() -> None:
    """Stop exactly the broker and Redis that `agentfabric up` started."""
    from streams.embedded import EmbeddedStack

    s = _settings()
    stopped = EmbeddedStack(s.state_dir).stop()
    if not stopped:
        out.print(f"nothing to stop (no running stack recorded in {s.state_dir})")
    for proc in stopped:
        out.print(f"stopped {proc.name} (pid {proc.pid})")


@topics_app.command("apply")
def topics_apply() -> None:
    """Create every topic the loaded workflows need (partitions from AGENTFABRIC_PARTITIONS)."""
    from .app import build_engine, provision

    s = _settings()
    result = _run(provision(s, build_engine(s)))
    for topic, state in sorted(result.items()):
        out.print(f"{state:8} {topic}")


@topics_app.command("list")
def topics_list() -> None:
    """List the topics the loaded workflows need, without touching the broker."""
    from streams.topics import TopicNames, required_topics

    from .app import build_engine

    s = _settings()
    for topic in required_topics(build_engine(s).workflows, TopicNames(s.topic_prefix)):
        print(topic)


@app.command()
def workflows() -> None:
    """Validate and list the loaded workflows."""
    from streams.topics import TopicNames

    from .app import build_engine
    from .tables import workflows_table

    s = _settings()
    out.print(workflows_table(build_engine(s).workflows, TopicNames(s.topic_prefix)))


@app.command()
def publish(
    topic: Annotated[str, typer.Argument(help="Trigger topic (af.triggers.crm) or its source "
                                              "(crm).")],
    file: Annotated[str, typer.Argument(help="JSON object, array or JSON lines; '-' for stdin.")],
) -> None:
    """Validate JSON events and publish them to a trigger topic (all or nothing)."""
    from .app import parse_events, publish_events, resolve_trigger_topic

    s = _settings()
    full_topic, source = resolve_trigger_topic(s, topic)
    text = sys.stdin.read() if file == "-" else _read(file)
    events = parse_events(text, source)
    count = _run(publish_events(s, full_topic, events))
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

    s = _settings()

    async def collect() -> list[Any]:
        rows = []
        async for result in read_results(s, workflow, follow=follow):
            if follow or as_json:
                print(result.model_dump_json(), flush=True)
            else:
                rows.append(result)
        return rows

    try:
        rows = _run(collect())
    except KeyboardInterrupt:
        return
    if not (follow or as_json):
        out.print(results_table(workflow, rows))


@dlq_app.command("list")
def dlq_list(as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
             ) -> None:
    """List dead letters: id, when, error, where from, reason."""
    from streams.dlq import read_dead_letters
    from streams.topics import TopicNames

    from .tables import dead_letters_table

    s = _settings()

    async def collect() -> list[Any]:
        return [d async for d in read_dead_letters(s, TopicNames(s.topic_prefix).dlq)]

    letters = _run(collect())
    if as_json:
        for letter in letters:
            print(letter.model_dump_json(exclude={"value", "headers"}))
    else:
        out.print(dead_letters_table(letters))


@dlq_app.command("show")
def dlq_show(dead_letter_id: Annotated[str, typer.Argument(help="Id or unique id prefix.")],
             ) -> None:
    """Show one dead letter in full, with its original message."""
    from streams.dlq import read_dead_letters
    from streams.topics import TopicNames

    from .tables import describe_dead_letter

    s = _settings()

    async def find() -> list[Any]:
        return [d async for d in read_dead_letters(s, TopicNames(s.topic_prefix).dlq)
                if d.dead_letter_id.startswith(dead_letter_id)]

    matches = _run(find())
    if len(matches) != 1:
        raise ConfigError(f"{'no' if not matches else len(matches)} dead letters match "
                          f"'{dead_letter_id}'; run `agentfabric dlq list` for the ids")
    out.print(describe_dead_letter(matches[0]))


@app.command()
def worker(
    workflow: Annotated[list[str] | None, typer.Option(
        "--workflow", "-w", help="Run only this workflow's steps (repeatable).")] = None,
    router: Annotated[bool, typer.Option(help="Also route trigger events to workflows.")] = True,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run step consumers (and the router) until SIGTERM/SIGINT; in-flight work finishes."""
    from streams.runner import Worker

    from .app import build_engine, setup_logging

    setup_logging(log_level)
    s = _settings()
    w = Worker(s, build_engine(s), workflows=workflow, router=router)

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

    _run(serve())


@app.command()
def demo(keep: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
         ) -> None:
    """The main job: start the embedded stack, provision topics, run workers, publish sample
    CRM and ERP events, print the results, and stop everything."""
    from .demo import run_demo

    raise typer.Exit(_run(run_demo(_settings(), out, keep=keep)))


@kb_app.command("ingest")
def kb_ingest(
    collection: Annotated[str, typer.Argument(help="Collection name, e.g. Accounts.")],
    files: Annotated[list[Path], typer.Argument(help=".jsonl documents (id, text, metadata) "
                                                     "or text files to chunk.")],
    tenant: Annotated[str, typer.Option(help="The tenant the documents belong to.")] =
    "default",
    max_words: Annotated[int, typer.Option(help="Chunk size for text files.")] = 120,
) -> None:
    """Chunk, embed and store documents in a knowledge base, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from tools.knowledge import read_documents

    from .app import build_knowledge

    s = _settings()
    documents = read_documents(files, max_words=max_words)
    if not documents:
        raise ConfigError("no documents in those files")

    async def ingest() -> int:
        kb = build_knowledge(s)
        try:
            with Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), console=out) as bar:
                task = bar.add_task(f"embedding into {collection}/{tenant}",
                                    total=len(documents))
                return await kb.ingest(collection, tenant, documents,
                                       progress=lambda n: bar.advance(task, n))
        finally:
            await kb.close()

    count = _run(ingest())
    out.print(f"stored {count} documents in {collection} for tenant {tenant}")


@kb_app.command("search")
def kb_search(
    collection: Annotated[str, typer.Argument(help="Collection name.")],
    query: Annotated[str, typer.Argument(help="What to look for.")],
    tenant: Annotated[str, typer.Option(help="Whose documents.")] = "default",
    k: Annotated[int, typer.Option("-k", help="How many hits.")] = 5,
    alpha: Annotated[float, typer.Option(help="1 vector, 0 keyword, between hybrid.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Search a knowledge base the way a lookup step does."""
    from .app import build_knowledge

    s = _settings()

    async def search() -> list[Any]:
        kb = build_knowledge(s)
        try:
            return await kb.search(collection, tenant, query, k=k, alpha=alpha)
        finally:
            await kb.close()

    for hit in _run(search()):
        if as_json:
            print(hit.model_dump_json())
        else:
            out.print(f"{hit.score:6.3f}  {hit.id:14}  {hit.text[:110]}")


@app.command("eval")
def eval_cases(
    workflow: Annotated[str, typer.Argument(help="Workflow to evaluate.")],
    cases: Annotated[Path, typer.Argument(help="Cases YAML (see docs/evals.md).")],
    report: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="A previous report: flag "
                                                       "regressions against it.")] = None,
    external_workers: Annotated[bool, typer.Option(
        help="Use workers already running instead of starting one in this process.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all results.")] = 120.0,
) -> None:
    """Run cases through the real fabric and check their results: pass rate, p50/p95
    latency, tokens, cost. Exit 1 on a failed case, or with --baseline on a regression."""
    from agents.evals import EvalReport, compare, load_suite

    from .app import build_engine
    from .evals import run_eval
    from .tables import eval_table

    s = _settings()
    suite = load_suite(cases)
    old = None
    if baseline is not None:
        try:
            old = EvalReport.model_validate_json(baseline.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{baseline}: not an eval report ({exc})") from exc

    async def evaluate() -> EvalReport:
        engine = build_engine(s)
        try:
            return await run_eval(s, engine, workflow, suite,
                                  start_worker=not external_workers, timeout_s=timeout)
        finally:
            if engine.models is not None:
                await engine.models.close()

    result = _run(evaluate())
    out.print(eval_table(result))
    summary = result.summary()
    out.print(f"pass rate {summary['pass_rate']:.0%} ({len(result.cases)} cases), p50 "
              f"{summary['p50_ms']} ms, p95 {summary['p95_ms']} ms, tokens "
              f"{summary['input_tokens']} in / {summary['output_tokens']} out, cost "
              f"${summary['cost_usd']:.6f}")
    if report is not None:
        report.write_text(result.model_dump_json(indent=2), encoding="utf-8")
        out.print(f"report written to {report}")
    if old is not None:
        regressions = compare(result, old)
        for line in regressions:
            out.print(f"[red]regression:[/red] {line}")
        if regressions:
            raise typer.Exit(1)
        out.print("no regressions against the baseline")
    elif result.pass_rate < 1:
        raise typer.Exit(1)


@runs_app.command("replay")
def runs_replay(run_id: Annotated[str, typer.Argument(help="The run id (see `results`).")],
                ) -> None:
    """Re-execute a recorded run against its recorded model and tool answers and compare
    every step's output byte for byte; exit 1 if any differs."""
    from agents.replay import replay_run

    from .app import build_engine, read_recordings

    s = _settings()

    async def replay() -> list[Any]:
        engine = build_engine(s)
        try:
            return await replay_run(engine, await read_recordings(s, run_id))
        finally:
            if engine.models is not None:
                await engine.models.close()

    steps = _run(replay())
    for step in steps:
        verdict = "identical" if step.identical else "DIFFERENT"
        out.print(f"{step.step:24} {len(step.replayed):6} bytes  {verdict}")
        if not step.identical:
            out.print(f"  recorded: {step.recorded}\n  replayed: {step.replayed}")
    same = sum(s.identical for s in steps)
    out.print(f"{same}/{len(steps)} step outputs byte-identical")
    if same != len(steps):
        raise typer.Exit(1)


@app.command("model-server")
def model_server(
    script: Annotated[Path | None, typer.Option(help="YAML script of behaviours; default: the "
                                                     "shipped demo script.")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default AGENTFABRIC_MODEL_SERVER_PORT)"
                                                  "; 0 picks a free one.")] = None,
) -> None:
    """Serve a local OpenAI-compatible model (chat with tool calls, embeddings, usage) driven by
    a deterministic script, with latency and fault injection. For tests and offline demos."""
    from agents.model_script import ModelScript
    from agents.model_server import serve

    s = _settings()
    loaded = ModelScript.load(script or _demo_script())

    async def run() -> None:
        handle = await serve(loaded, port=s.model_server_port if port is None else port)
        out.print(f"model server on {handle.url} (script {script or 'demo'}); Ctrl-C stops it")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await handle.close()

    _run(run())


def _demo_script() -> Path:
    from importlib import resources

    return Path(str(resources.files("agents").joinpath("model_scripts", "demo.yaml")))


@app.command("settings")
def show_settings() -> None:
    """Print every setting with its current value and its environment variable."""
    s = _settings()
    for name, field in Settings.model_fields.items():
        value = s.secret_free_redis_url if name == "redis_url" else getattr(s, name)
        print(f"AGENTFABRIC_{name.upper()}={json.dumps(str(value))[1:-1]}"
              f"    # {field.description or ''}".rstrip(" #"))


def main() -> None:
    # one-shot commands report failures as one error line; `worker` logs in full
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(2)
    except AgentFabricError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(1)
