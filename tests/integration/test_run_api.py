"""The run API over real HTTP (uvicorn on a free port, in this process) against the real
embedded broker and Redis, with a worker so runs complete: keys per tenant, POST /runs,
GET /runs/{id}, the event stream, tenant isolation, idempotency; and the run store's
ordering rules and the 503 when the broker does not acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from agentfabric.errors import UnavailableError
from agentfabric.ingress.app import create_app
from agentfabric.ingress.context import IngressContext
from agentfabric.ingress.keys import ApiKeyStore
from agentfabric.ingress.runs import run_routes
from agentfabric.ingress.runstore import (
    load_run,
    record_dead_letter,
    record_result,
    record_started,
)
from agentfabric.settings import Settings
from agents.loader import load_workflows
from schemas.models import DeadLetter, RunResult, utc_now
from streams.embedded import free_port
from streams.kafka import Outgoing
from streams.reader import read_topic
from streams.topics import TopicNames

from .helpers import invoice_case, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _with_run_routes(app: Starlette) -> Starlette:
    """The app as ``create_app`` builds it, with the run API mounted if it is not yet."""
    if not any(isinstance(r, Route) and r.path == "/runs" for r in app.router.routes):
        app.router.routes.extend(run_routes())
    return app


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """The ingress app served by uvicorn on a free port until the block ends."""
    port = free_port()
    config = uvicorn.Config(_with_run_routes(create_app(settings)), host="127.0.0.1",
                            port=port, lifespan="on", log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("the server stopped before it started")
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def wait_finished(client: httpx.AsyncClient, run_id: str, key: str,
                        within: float = 60) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            answer = await client.get(f"/runs/{run_id}", headers=bearer(key))
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            if body["status"] != "running":
                return body
            await asyncio.sleep(0.1)
    return await asyncio.wait_for(poll(), within)


async def sse_events(client: httpx.AsyncClient, path: str, key: str,
                     ) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    async with client.stream("GET", path, headers=bearer(key)) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        name = ""
        async for line in answer.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    return events


async def results_of(settings: Settings, run_id: str) -> list[RunResult]:
    from schemas.serde import decode

    topic = TopicNames(settings.topic_prefix).results("invoice_triage")
    return [decode(r.value, r.headers, RunResult) async for r in read_topic(settings, topic)
            if r.key == run_id.encode()]


async def test_run_api_end_to_end(settings: Settings, redis_client: Any) -> None:
    keys = ApiKeyStore(redis_client, settings.topic_prefix)
    acme, _ = await keys.create("acme", "test")
    globex, _ = await keys.create("globex")
    revoked, revoked_info = await keys.create("acme", "old")
    await keys.revoke(revoked_info.key_id)
    rng = random.Random(3)
    cases = [invoice_case(i, rng) for i in range(3)]

    async with running_worker(settings), serving(settings) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        # authentication
        body = {"workflow": "invoice_triage", "input": cases[0].event.payload}
        no_key = await client.post("/runs", json=body)
        assert no_key.status_code == 401
        assert "WWW-Authenticate" in no_key.headers
        assert (await client.post("/runs", json=body, headers=bearer(revoked))).status_code \
            == 401
        assert (await client.post("/runs", json=body, headers=bearer(acme[:-3] + "xyz"))
                ).status_code == 401
        # request problems
        unknown = await client.post("/runs", json={"workflow": "nope", "input": {}},
                                    headers=bearer(acme))
        assert unknown.status_code == 404
        assert "nope" in unknown.json()["error"]["message"]
        other = await client.post("/runs", json={**body, "tenant": "globex"},
                                  headers=bearer(acme))
        assert other.status_code == 403
        assert "tenant 'acme'" in other.json()["error"]["message"]
        bad_input = await client.post("/runs", json={"workflow": "invoice_triage",
                                                     "input": {"amount": "lots"}},
                                      headers=bearer(acme))
        assert bad_input.status_code == 422, bad_input.text
        assert (await client.post("/runs", content=b"{not json", headers=bearer(acme))
                ).status_code == 400

        # a run starts (X-API-Key works too), finishes, and only its tenant sees it
        started = await client.post("/runs", json={**body, "tenant": "acme"},
                                    headers={"X-API-Key": acme})
        assert started.status_code == 202, started.text
        run = started.json()
        assert run["status"] == "running"
        assert run["tenant"] == "acme"
        assert run["links"]["self"] == f"/runs/{run['run_id']}"
        done = await wait_finished(client, run["run_id"], acme)
        assert done["status"] == "completed", done
        for field, value in cases[0].expected.items():
            assert done["output"][field] == value
        assert done["tenant"] == "acme"
        assert done["workflow"] == "invoice_triage"
        assert done["usage"]["steps"] >= 1
        assert done["finished_at"]
        assert done["started_at"]
        hidden = await client.get(f"/runs/{run['run_id']}", headers=bearer(globex))
        assert hidden.status_code == 404
        assert (await client.get(f"/runs/{run['run_id']}/events", headers=bearer(globex))
                ).status_code == 404
        assert (await client.get(f"/runs/{run['run_id']}")).status_code == 401
        assert (await client.get("/runs/no-such-run", headers=bearer(acme))).status_code == 404

        # the same idempotency key starts one run, whichever way it is sent
        keyed = {"workflow": "invoice_triage", "input": cases[1].event.payload,
                 "idempotency_key": "inv-once"}
        first = await client.post("/runs", json=keyed, headers=bearer(acme))
        second = await client.post("/runs", json={k: v for k, v in keyed.items()
                                                  if k != "idempotency_key"},
                                   headers={**bearer(acme), "Idempotency-Key": "inv-once"})
        assert first.status_code == 202
        assert second.status_code == 200
        assert second.headers["Idempotent-Replayed"] == "true"
        assert first.json()["run_id"] == second.json()["run_id"]
        conflict = await client.post("/runs", json={**keyed, "input": cases[2].event.payload},
                                     headers=bearer(acme))
        assert conflict.status_code == 409
        # another tenant's same key is another run
        theirs = await client.post("/runs", json=keyed, headers=bearer(globex))
        assert theirs.status_code == 202
        assert theirs.json()["run_id"] != first.json()["run_id"]

        # the event stream: status changes, then the result, then the end
        streamed = await client.post("/runs", json={"workflow": "invoice_triage",
                                                    "input": cases[2].event.payload},
                                     headers=bearer(acme))
        events = await asyncio.wait_for(
            sse_events(client, f"/runs/{streamed.json()['run_id']}/events", acme), 60)
        names = [name for name, _ in events]
        assert names[-1] == "result"
        assert names.count("result") == 1
        assert set(names[:-1]) == {"status"}
        statuses = [data["status"] for name, data in events if name == "status"]
        assert statuses[-1] == "completed"
        assert len(statuses) == len(set(statuses))
        assert events[-1][1]["output"]["invoice_id"] == cases[2].expected["invoice_id"]

        once = await wait_finished(client, first.json()["run_id"], acme)
        assert once["output"]["invoice_id"] == cases[1].expected["invoice_id"]
    assert len(await results_of(settings, first.json()["run_id"])) == 1


class RefusingProducer:
    """A producer whose broker never acknowledges."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_all(self, messages: Sequence[Outgoing]) -> None:
        self.sent += len(messages)
        raise UnavailableError("the broker did not acknowledge a message (timeout)")


async def test_broker_unavailable_is_503(settings: Settings, redis_client: Any) -> None:
    producer = RefusingProducer()
    app = Starlette(routes=run_routes())
    app.state.ctx = IngressContext(settings=settings, producer=producer,  # type: ignore[arg-type]
                                   redis=redis_client,
                                   workflows=load_workflows(settings.workflows_dir),
                                   names=TopicNames(settings.topic_prefix))
    key, _ = await ApiKeyStore(redis_client, settings.topic_prefix).create("acme")
    case = invoice_case(0, random.Random(1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://ingress") as client:
        answer = await client.post("/runs", headers=bearer(key), json={
            "workflow": "invoice_triage", "input": case.event.payload,
            "idempotency_key": "k1"})
    assert answer.status_code == 503
    assert answer.headers["Retry-After"].isdigit()
    assert producer.sent == 1
    # nothing recorded: a retry with the same key sends again
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://ingress") as client:
        again = await client.post("/runs", headers=bearer(key), json={
            "workflow": "invoice_triage", "input": case.event.payload,
            "idempotency_key": "k1"})
    assert again.status_code == 503
    assert producer.sent == 2


async def test_run_store_ordering(redis_client: Any) -> None:
    prefix, ttl = f"t{uuid.uuid4().hex[:10]}", 600
    now = utc_now()
    result = RunResult(run_id="r1", workflow="wf", workflow_version=1, tenant="acme",
                       status="completed", output={"ok": True}, event_id="e", source="api",
                       event_type="run.wf", started_at=now - timedelta(seconds=1),
                       finished_at=now)
    letter = DeadLetter(dead_letter_id="d1", reason="the tool failed", error_type="ToolError",
                        topic="x", partition=0, offset=1, consumer_group="g", run_id="r1",
                        workflow="wf", tenant="acme")
    # a result recorded before the start keeps its status; a later dead letter changes nothing
    await record_result(redis_client, prefix, result, ttl)
    await record_started(redis_client, prefix, "r1", "acme", "wf", ttl)
    assert not await record_dead_letter(redis_client, prefix, letter, ttl)
    found = await load_run(redis_client, prefix, "r1")
    assert found is not None
    assert found[0].status == "completed"
    assert found[0].output == {"ok": True}
    assert found[0].error is None
    # a dead letter marks a running run, and a later result (a replay) wins
    await record_started(redis_client, prefix, "r2", "acme", "wf", ttl)
    assert await record_dead_letter(redis_client, prefix,
                                    letter.model_copy(update={"run_id": "r2"}), ttl)
    found = await load_run(redis_client, prefix, "r2")
    assert found is not None
    assert found[0].status == "dead_lettered"
    assert found[0].error == "the tool failed"
    await record_result(redis_client, prefix, result.model_copy(update={"run_id": "r2"}), ttl)
    found = await load_run(redis_client, prefix, "r2")
    assert found is not None
    assert found[0].status == "completed"
    assert found[0].error is None
    assert 0 < await redis_client.ttl(f"{prefix}:runs:r2") <= ttl


async def test_event_stream_heartbeats_and_ends_at_its_bound(
        settings: Settings, redis_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentfabric.ingress import runs

    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.1)
    bounded = settings.model_copy(update={"run_events_max_s": 0.6})
    app = Starlette(routes=run_routes())
    app.state.ctx = IngressContext(settings=bounded, producer=RefusingProducer(),  # type: ignore[arg-type]
                                   redis=redis_client,
                                   workflows=load_workflows(settings.workflows_dir),
                                   names=TopicNames(settings.topic_prefix))
    key, _ = await ApiKeyStore(redis_client, settings.topic_prefix).create("acme")
    await record_started(redis_client, settings.topic_prefix, "never-ends", "acme",
                         "invoice_triage", 600)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://ingress") as client:
        answer = await asyncio.wait_for(
            client.get("/runs/never-ends/events", headers=bearer(key)), 10)
    assert answer.status_code == 200
    text = answer.text
    assert text.startswith('event: status\ndata: {"run_id":"never-ends","status":"running"}')
    assert ": keep-alive" in text
    assert text.rstrip().split("\n")[-2] == "event: timeout"


def test_keys_cli(settings: Settings) -> None:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    env = {**clean, "AGENTFABRIC_REDIS_URL": settings.redis_url,
           "AGENTFABRIC_TOPIC_PREFIX": settings.topic_prefix}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agentfabric", "keys", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    created = cli("create", "--tenant", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[0]
    assert key.startswith("af_")
    assert "cannot be shown again" in created.stdout
    made = json.loads(cli("create", "--tenant", "globex", "--json").stdout)
    assert made["key"].startswith(made["prefix"])
    assert made["tenant"] == "globex"
    listed = cli("list", "--json")
    assert listed.returncode == 0
    assert key not in listed.stdout
    assert made["key"] not in listed.stdout
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["tenant"] for r in rows] == ["acme", "globex"]
    assert [json.loads(line)["tenant"] for line in
            cli("list", "--tenant", "globex", "--json").stdout.splitlines()] == ["globex"]
    table = cli("list")
    assert table.returncode == 0
    assert rows[0]["key_id"] in table.stdout
    assert key not in table.stdout
    revoked = cli("revoke", rows[0]["key_id"])
    assert revoked.returncode == 0
    assert "revoked key" in revoked.stdout
    assert json.loads(cli("list", "--tenant", "acme", "--json").stdout)["revoked_at"]
    unknown = cli("revoke", "ffffffffffff")
    assert unknown.returncode == 2
    assert "no API key" in unknown.stderr
