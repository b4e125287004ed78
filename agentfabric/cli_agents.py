"""CLI commands for agents: the local model server, knowledge bases, evals, run replay."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import out, run
from .cli_common import settings as settings_
from .errors import ConfigError

__all__ = ["register"]

kb_app = typer.Typer(no_args_is_help=True, help="Knowledge bases: ingest and search.")
runs_app = typer.Typer(no_args_is_help=True, help="Recorded runs: replay them.")


def register(app: typer.Typer) -> None:
    """Add these commands to the main app."""
    app.add_typer(kb_app, name="kb")
    app.add_typer(runs_app, name="runs")
    app.command("eval")(eval_cases)
    app.command("model-server")(model_server)


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

    s = settings_()
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

    count = run(ingest())
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

    s = settings_()

    async def search() -> list[Any]:
        kb = build_knowledge(s)
        try:
            return await kb.search(collection, tenant, query, k=k, alpha=alpha)
        finally:
            await kb.close()

    for hit in run(search()):
        if as_json:
            print(hit.model_dump_json())
        else:
            out.print(f"{hit.score:6.3f}  {hit.id:14}  {hit.text[:110]}")


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

    s = settings_()
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

    result = run(evaluate())
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

    s = settings_()

    async def replay() -> list[Any]:
        engine = build_engine(s)
        try:
            return await replay_run(engine, await read_recordings(s, run_id))
        finally:
            if engine.models is not None:
                await engine.models.close()

    steps = run(replay())
    for step in steps:
        verdict = "identical" if step.identical else "DIFFERENT"
        out.print(f"{step.step:24} {len(step.replayed):6} bytes  {verdict}")
        if not step.identical:
            out.print(f"  recorded: {step.recorded}\n  replayed: {step.replayed}")
    same = sum(s.identical for s in steps)
    out.print(f"{same}/{len(steps)} step outputs byte-identical")
    if same != len(steps):
        raise typer.Exit(1)


def model_server(
    script: Annotated[Path | None, typer.Option(help="YAML script of behaviours; default: the "
                                                     "shipped demo script.")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default AGENTFABRIC_MODEL_SERVER_PORT)"
                                                  "; 0 picks a free one.")] = None,
    host: Annotated[str, typer.Option(help="Listen address (0.0.0.0 in a container).")]
    = "127.0.0.1",
) -> None:
    """Serve a local OpenAI-compatible model (chat with tool calls, embeddings, usage) driven by
    a deterministic script, with latency and fault injection. For tests and offline demos."""
    from agents.model_script import ModelScript
    from agents.model_server import serve

    s = settings_()
    loaded = ModelScript.load(script or _demo_script())

    async def serve_until_stopped() -> None:
        handle = await serve(loaded, host=host,
                             port=s.model_server_port if port is None else port)
        out.print(f"model server on {handle.url} (script {script or 'demo'}); Ctrl-C stops it")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await handle.close()

    run(serve_until_stopped())


def _demo_script() -> Path:
    from importlib import resources

    return Path(str(resources.files("agents").joinpath("model_scripts", "demo.yaml")))


