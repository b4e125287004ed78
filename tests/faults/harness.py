"""The fault suite's services and workflow: the side-effect HTTP service, the local model
server with per-call tracking, and the ``billing`` workflow (an HTTP side effect, then an
``llm`` step) with its model script."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, web

from agentfabric.app import required_topics
from agentfabric.settings import Settings
from agents.engine import run_id_for
from agents.loader import load_workflows
from agents.model_script import ModelScript
from agents.model_server import create_app
from schemas.models import TriggerEvent
from streams.topics import TopicNames, apply_topics

from .worker_main import IDEMPOTENCY_HEADER

__all__ = ["WORKFLOW", "Call", "ModelServer", "SideEffectService", "billing_workflow",
           "invoices", "judge_script", "provision", "run_ids", "write_setup"]

WORKFLOW = "billing"


def billing_workflow() -> dict[str, Any]:
    """Trigger ``invoice.posted`` -> ``charge`` (the HTTP side effect) -> ``judge`` (llm)."""
    judge: dict[str, Any] = {
        "id": "judge", "kind": "llm", "model": "local",
        "prompt": {"invoice": "{{ input.invoice_id }}", "seq": "{{ steps.charge.seq }}"},
        "output_schema": {"type": "object", "required": ["verdict", "invoice"]}}
    return {
        "name": WORKFLOW, "version": 1,
        "trigger": {"source": "erp", "event_types": ["invoice.posted"]},
        "steps": [
            {"id": "charge", "kind": "tool", "tool": "faults.apply",
             "args": {"subject": "{{ input.invoice_id }}", "amount": "{{ input.amount }}"}},
            judge,
        ],
        "output": {"invoice_id": "{{ input.invoice_id }}", "seq": "{{ steps.charge.seq }}",
                   "verdict": "{{ steps.judge.verdict }}",
                   "judged": "{{ steps.judge.invoice }}"},
    }


def judge_script(latency_ms: int) -> ModelScript:
    return ModelScript.parse({"rules": [{
        "name": "judge", "match": {"workflow": WORKFLOW, "step": "judge"},
        "latency_ms": latency_ms,
        "turns": [{"content": {"verdict": "approve", "invoice": "{{ user_json.invoice }}"}}]}]})


def write_setup(folder: Path, model_url: str, *workflows: dict[str, Any]) -> tuple[Path, Path]:
    """Workflow files and a model registry pointing at ``model_url``."""
    wf_dir = folder / "workflows"
    wf_dir.mkdir(parents=True)
    for doc in workflows:
        (wf_dir / f"{doc['name']}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    models = folder / "models.yaml"
    models.write_text(yaml.safe_dump({
        "providers": {"local": {"base_url": model_url}},
        "models": {"local": {"provider": "local", "model": "fabric-local-1"}}}))
    return wf_dir, models


async def provision(settings: Settings) -> list[str]:
    """Create every topic the workflows in ``settings.workflows_dir`` need."""
    topics = required_topics(load_workflows(settings.workflows_dir),
                             TopicNames(settings.topic_prefix), settings.retry_tiers_s)
    await apply_topics(settings.bootstrap_servers, topics, partitions=settings.partitions,
                       replication_factor=settings.replication_factor)
    return topics


def invoices(n: int, first: int = 0) -> list[TriggerEvent]:
    return [TriggerEvent(event_id=f"inv-{i}", source="erp", event_type="invoice.posted",
                         tenant="acme", payload={"invoice_id": f"INV-{i}", "amount": i % 997})
            for i in range(first, first + n)]


def run_ids(events: Iterable[TriggerEvent], workflow: str = WORKFLOW) -> dict[str, str]:
    """run id -> invoice id"""
    return {run_id_for(e, workflow): e.payload["invoice_id"] for e in events}


@dataclass
class SideEffectService:
    """A small HTTP service: ``POST /apply`` applies a side effect once per idempotency key
    (a repeated key gets the first answer again) and counts every call."""

    latency_s: float = 0.0
    port: int = 0
    calls: Counter[str] = field(default_factory=Counter)  # idempotency key -> calls
    applied: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> the answer
    effects: Counter[str] = field(default_factory=Counter)  # subject -> effects applied
    in_flight: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/apply", self._apply)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(next(a[1] for a in runner.addresses if isinstance(a, tuple)))
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _apply(self, request: web.Request) -> web.Response:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if not key:
            return web.json_response({"error": "no Idempotency-Key"}, status=400)
        body = await request.json()
        self.calls[key] += 1
        self.in_flight += 1
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)  # the service's own work
        finally:
            self.in_flight -= 1
        if key not in self.applied:  # no await between the check and the write
            self.applied[key] = {"subject": body["subject"], "seq": len(self.applied) + 1,
                                 "amount": body["amount"]}
            self.effects[body["subject"]] += 1
        return web.json_response(self.applied[key])

    def figures(self) -> dict[str, int]:
        return {"keys": len(self.applied), "calls": sum(self.calls.values()),
                "repeated_calls": sum(n - 1 for n in self.calls.values()),
                "effects": sum(self.effects.values())}



@dataclass(frozen=True)
class Call:
    """One chat request the model server answered (or was answering when it stopped)."""

    run: str  # the x-agentfabric-run header
    port: int  # the client's port: which worker process asked
    start: float  # monotonic
    end: float


@dataclass
class ModelServer:
    """The local scripted model server (``agents.model_server``) in this process, with a
    middleware that keeps each chat request's run, client port, start and end."""

    script: ModelScript
    port: int = 0
    calls: list[Call] = field(default_factory=list)
    running: dict[int, tuple[str, int, float]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = create_app(self.script)

        @web.middleware
        async def track(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                        ) -> web.StreamResponse:
            if request.path != "/v1/chat/completions":
                return await handler(request)
            peer = request.transport.get_extra_info("peername") if request.transport else None
            run, port = request.headers.get("x-agentfabric-run", "?"), int(peer[1]) if peer else 0
            start = time.monotonic()
            self.running[id(request)] = (run, port, start)
            try:
                return await handler(request)
            finally:
                del self.running[id(request)]
                self.calls.append(Call(run, port, start, time.monotonic()))

        app.middlewares.append(track)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(next(a[1] for a in runner.addresses if isinstance(a, tuple)))
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def request_log(self) -> list[dict[str, Any]]:
        """The server's own request log (``GET /_requests``)."""
        async with ClientSession() as session, \
                session.get(f"http://127.0.0.1:{self.port}/_requests") as response:
            log: list[dict[str, Any]] = await response.json()
            return log

    def unanswered(self, ports: set[int], moment: float, grace_s: float) -> set[str]:
        """Runs whose request from one of ``ports`` (a worker's connections) was not answered
        ``grace_s`` before ``moment``: the calls that worker had in flight when it died (an
        answer it had received but not yet journaled counts too). By port, not by time
        alone: the test's own event loop may start handling a dead worker's last requests
        after the kill."""
        found = {c.run for c in self.calls if c.port in ports and c.end >= moment - grace_s}
        return found | {run for run, port, _ in self.running.values() if port in ports}


