"""``agentfabric demo``: the whole fabric on the embedded stack, start to finish.

Starts the broker, Redis and the sample CRM and ERP services (or uses the ones
`agentfabric up` started) and the local scripted model server, ingests the sample account
knowledge base, provisions the topics, runs a worker, publishes the sample CRM leads and ERP
invoices plus one malformed event, waits for every result, prints them with one line per tool
the gateway called (calls, failures, breaker state), and stops what it started.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from agentfabric.worker import Worker, background_worker
from agents.engine import Engine, run_id_for
from agents.model_script import ModelScript
from agents.model_server import serve
from agents.models import ModelClient, load_registry
from schemas.models import RunResult, TriggerEvent
from streams.dlq import read_dead_letters
from streams.embedded import EmbeddedStack
from streams.kafka import Outgoing, Producer
from streams.reader import read_until
from streams.topics import TopicNames
from tools.knowledge import read_documents

from .app import build_engine, parse_events, provision, publish_events
from .settings import Settings
from .tables import dead_letters_table, results_table

__all__ = ["run_demo", "sample_events"]

SAMPLES = {"crm": "crm_leads.json", "erp": "erp_invoices.json"}


def DEMO_SCRIPT() -> Path:
    return Path(str(resources.files("agents").joinpath("model_scripts", "demo.yaml")))


def KB_FILE() -> Path:
    return Path(str(resources.files("tools").joinpath("data", "kb", "companies.jsonl")))
RESULT_TIMEOUT_S = 60.0


def sample_events() -> dict[str, list[TriggerEvent]]:
    """The shipped sample events by source."""
    folder = resources.files("agentfabric").joinpath("examples")
    return {source: parse_events(folder.joinpath(name).read_text(encoding="utf-8"), source)
            for source, name in SAMPLES.items()}


async def run_demo(settings: Settings, out: Console, *, keep: bool = False) -> int:
    stack = EmbeddedStack(settings.state_dir, host=settings.broker_host,
                          broker_port=settings.broker_port, redis_port=settings.redis_port,
                          crm_port=settings.crm_port, erp_port=settings.erp_port)
    started = stack.running() is None
    if started:
        info = stack.start(services=True)
        out.print(f"started the embedded broker (pid {info.broker.pid}, "
                  f"{info.bootstrap_servers}) and Redis (pid {info.redis.pid}, {info.redis_url})")
        for name, proc in info.services.items():
            out.print(f"started the sample {name.upper()} service (pid {proc.pid}, "
                      f"{info.service_urls[name]})")
    else:
        info = stack.running()  # type: ignore[assignment]
        out.print("using the embedded stack that `agentfabric up` started")
    s = settings.model_copy(update={"bootstrap_servers": info.bootstrap_servers,
                                    "redis_url": info.redis_url,
                                    "service_urls": {**settings.service_urls,
                                                     **info.service_urls}})
    try:
        return await _run(s, out)
    finally:
        if started and not keep:
            stack.stop()
            out.print("stopped the embedded broker, Redis and the sample services")


async def _run(s: Settings, out: Console) -> int:
    names = TopicNames(s.topic_prefix)
    server = await serve(ModelScript.load(DEMO_SCRIPT()), port=0)
    registry = load_registry(s.models_file)
    local = registry.providers["local"].model_copy(update={"base_url": server.url})
    models = ModelClient(registry.model_copy(update={"providers": {**registry.providers,
                                                                  "local": local}}),
                         timeout_s=s.model_timeout_s, max_retries=s.model_max_retries)
    engine = build_engine(s, models)
    out.print(f"local model server on {server.url} (scripted, OpenAI-compatible)")
    try:
        return await _with_engine(s, out, names, engine)
    finally:
        await models.close()
        if engine.knowledge is not None:
            await engine.knowledge.close()
        await server.close()


async def _ingest_accounts(out: Console, engine: Engine, tenants: set[str]) -> None:
    assert engine.knowledge is not None
    documents = read_documents([KB_FILE()])
    t0 = time.monotonic()
    for tenant in sorted(tenants):
        await engine.knowledge.ingest("Accounts", tenant, documents)
    out.print(f"knowledge base Accounts: {len(documents)} company descriptions embedded "
              f"(all-MiniLM-L6-v2, offline) for tenant(s) {', '.join(sorted(tenants))} in "
              f"{time.monotonic() - t0:.1f}s")


async def _with_engine(s: Settings, out: Console, names: TopicNames, engine: Engine) -> int:
    events = sample_events()
    await _ingest_accounts(out, engine, {e.tenant for batch in events.values() for e in batch})
    created = await provision(s, engine)
    out.print(f"provisioned {len(created)} topics ({s.partitions} partitions each)")
    async with background_worker(s, engine) as worker:
        steps = sum(1 for c in worker.consumers
                    if c.name not in ("router", "retry", "approvals", "decisions", "ledger"))
        out.print(f"worker ready: router + {steps} step consumers (+ retry, approvals, "
                  f"decisions and the run ledger)")
        if worker.metrics_url:
            out.print(f"metrics at {worker.metrics_url}")
        t0 = time.monotonic()
        expected: dict[str, set[str]] = {}
        for source, batch in events.items():
            await publish_events(s, names.trigger(source), batch)
            for event in batch:
                for wf in engine.workflows.starting(event):
                    expected.setdefault(wf.name, set()).add(run_id_for(event, wf.name))
            out.print(f"published {len(batch)} {source.upper()} events to "
                      f"{names.trigger(source)}")
        await _publish_malformed(s, names)
        out.print(f"published 1 malformed event to {names.trigger('crm')}")
        results = await asyncio.wait_for(_collect(s, names, expected, worker),
                                         RESULT_TIMEOUT_S)
        elapsed = time.monotonic() - t0
        for workflow in sorted(results):
            out.print(results_table(workflow, results[workflow]))
        letters = [d async for d in read_dead_letters(s, names.dlq)]
        out.print(dead_letters_table(letters))
        total = sum(len(r) for r in results.values())
        out.print(f"{total} runs completed in {elapsed:.2f}s; {len(letters)} dead letter(s)")
        out.print("tool gateway (calls, failures, breaker):")
        for line in _tool_lines(engine):
            out.print(f"  {line}", highlight=False)
        return 0


def _tool_lines(engine: Engine) -> list[str]:
    from tools.gateway.pipeline import Gateway

    return engine.tools.summary() if isinstance(engine.tools, Gateway) else []


async def _publish_malformed(s: Settings, names: TopicNames) -> None:
    producer = Producer(s, client_id="agentfabric-demo")
    await producer.start()
    try:
        await producer.send_all([Outgoing(names.trigger("crm"), b"bad-1",
                                          b'{"event_type": "lead.created", "payload": ')])
    finally:
        await producer.stop()


async def _collect(s: Settings, names: TopicNames, expected: dict[str, set[str]],
                   worker: Worker) -> dict[str, list[RunResult]]:
    """Read each result topic until every expected run has its result."""
    results: dict[str, list[RunResult]] = {}
    for workflow, run_ids in expected.items():
        def complete(found: list[RunResult], ids: set[str] = run_ids) -> bool:
            return ids <= {r.run_id for r in found}

        found = await read_until(s, names.results(workflow), RunResult, complete,
                                 each=lambda _: worker.check_alive())
        ours = {r.run_id: r for r in found if r.run_id in run_ids}
        results[workflow] = sorted(ours.values(), key=lambda r: r.event_id)
    return results

