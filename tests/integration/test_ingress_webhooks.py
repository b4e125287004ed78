"""The webhook ingress over real HTTP (uvicorn on a free port) against the real embedded
broker and Redis: HubSpot v3 deliveries start runs that complete; bad deliveries reach no
topic; redeliveries start nothing new; a stopped broker gives 503 until it is back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from agentfabric.app import build_engine, provision
from agentfabric.ingress.app import create_app
from agentfabric.settings import Settings
from schemas.models import RunResult
from streams.embedded import EmbeddedStack, StackInfo, free_port
from streams.reader import read_topic
from streams.topics import TopicNames, apply_topics

from .helpers import collect_results, running_worker

pytestmark = pytest.mark.integration

SECRET = "hubspot-client-secret"
PUBLIC_URL = "https://hooks.example.com/webhooks/crm"
SOURCES = f"""
sources:
  crm:
    scheme: hubspot-v3
    secret_env: TEST_CRM_WEBHOOK_SECRET
    tenant: acme
    public_url: {PUBLIC_URL}
    event_type: >-
      {{{{ 'lead.created' if item.subscriptionType == 'contact.creation'
           else item.subscriptionType }}}}
    event_id: "hubspot-{{{{ item.eventId }}}}"
    payload: "{{{{ item.properties }}}}"
    max_body_bytes: 4096
"""


@pytest.fixture
def ingress_settings(settings: Settings, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("TEST_CRM_WEBHOOK_SECRET", SECRET)
    file = tmp_path / "sources.yaml"
    file.write_text(SOURCES)
    return settings.model_copy(update={"ingress_sources_file": file,
                                       "ingress_send_timeout_s": 2.0})


@contextlib.asynccontextmanager
async def running_ingress(settings: Settings) -> AsyncIterator[str]:
    """The ingress app served by uvicorn in this process on a free port, until the block
    exits (then shut down as on SIGTERM: lifespan closed, task awaited)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           lifespan="on", ws="none", log_config=None))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn sets it once bound and the lifespan has started
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "the ingress did not start within 30 s"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def lead(i: int, tag: str) -> dict[str, Any]:
    """One HubSpot webhook event carrying the lead's properties."""
    return {"eventId": i, "subscriptionId": 4242, "portalId": 62515, "appId": 54321,
            "occurredAt": 1575476112015, "subscriptionType": "contact.creation",
            "attemptNumber": 0, "objectId": 1000 + i, "changeSource": "CRM",
            "properties": {"lead_id": f"L-{tag}-{i}", "email": f"p{i}@contoso.com",
                           "first_name": "Pat", "last_name": f"N{i}", "title": "VP Sales"}}


def hubspot_signed(body: bytes, *, secret: str = SECRET, ts_ms: int | None = None,
                   uri: str = PUBLIC_URL) -> dict[str, str]:
    """Headers exactly as HubSpot's signature v3 documents them."""
    ts = str(int(time.time() * 1000) if ts_ms is None else ts_ms)
    source = b"POST" + uri.encode() + body + ts.encode()
    signature = base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest())
    return {"Content-Type": "application/json", "X-HubSpot-Signature-v3": signature.decode(),
            "X-HubSpot-Request-Timestamp": ts}


async def post(client: httpx.AsyncClient, url: str, events: list[dict[str, Any]],
               **signing: Any) -> httpx.Response:
    body = json.dumps(events).encode()
    return await client.post(f"{url}/webhooks/crm", content=body,
                             headers=hubspot_signed(body, **signing))


async def trigger_records(settings: Settings) -> list[Any]:
    return [r async for r in read_topic(settings,
                                        TopicNames(settings.topic_prefix).trigger("crm"))]


async def test_a_signed_hubspot_batch_starts_runs_that_complete_once(
        ingress_settings: Settings) -> None:
    s = ingress_settings
    async with running_worker(s), running_ingress(s) as url, \
            httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
        ready = await client.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text
        batch = [lead(1, "a"), lead(2, "a"), lead(3, "a")]
        first = await post(client, url, batch)
        assert first.status_code == 202, first.text
        answer = first.json()
        assert answer["tenant"] == "acme"
        assert len(answer["run_ids"]) == 3
        assert [e["status"] for e in answer["events"]] == ["accepted"] * 3
        # the same delivery again (HubSpot retries): the same run ids, nothing new sent
        again = await post(client, url, batch)
        assert again.status_code == 202, again.text
        assert again.json()["run_ids"] == answer["run_ids"]
        assert [e["status"] for e in again.json()["events"]] == ["duplicate"] * 3
        results = await collect_results(s, "lead_enrichment", 3)
    assert {r.run_id for r in results} == set(answer["run_ids"])
    assert all(isinstance(r, RunResult) and r.tenant == "acme" and r.status == "completed"
               for r in results), [(r.status, r.error) for r in results]
    assert len(results) == 3  # one run per event, although it was delivered twice
    assert len(await trigger_records(s)) == 3  # the redelivery was not produced again
    assert {r.output["lead_id"] for r in results} == {"L-a-1", "L-a-2", "L-a-3"}


async def test_rejected_deliveries_reach_no_topic(ingress_settings: Settings) -> None:
    s = ingress_settings
    await provision(s, build_engine(s))
    async with running_ingress(s) as url, httpx.AsyncClient(timeout=30) as client:
        body = json.dumps([lead(1, "r")]).encode()
        good = hubspot_signed(body)
        cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
            ("wrong signature", body, hubspot_signed(body, secret="not-it"), 401,
             "invalid_signature"),
            ("stale timestamp", body,
             hubspot_signed(body, ts_ms=int(time.time() * 1000) - 6 * 60_000), 401,
             "invalid_signature"),
            ("missing header", body,
             {k: v for k, v in good.items() if k != "X-HubSpot-Signature-v3"}, 401,
             "invalid_signature"),
            ("signed for another URL", body, hubspot_signed(body, uri=f"{url}/webhooks/crm"),
             401, "invalid_signature"),
            ("oversized body", b"[" + b" " * 5000 + b"]", good, 413, "body_too_large"),
        ]
        other_tenant = [{**lead(2, "r"), "tenant": "globex"}]
        other_body = json.dumps(other_tenant).encode()
        cases.append(("another tenant", other_body, hubspot_signed(other_body), 403,
                      "tenant_mismatch"))
        for what, content, headers, status, code in cases:
            response = await client.post(f"{url}/webhooks/crm", content=content,
                                         headers=headers)
            assert response.status_code == status, (what, response.text)
            assert response.json()["error"] == code, what
        unknown = await client.post(f"{url}/webhooks/nope", content=body, headers=good)
        assert unknown.status_code == 404
        other = await client.post(f"{url}/webhooks/crm", content=other_body,
                                  headers=hubspot_signed(other_body))
        assert "authenticated for tenant 'acme'" in other.json()["detail"]
        # a valid delivery afterwards is the only record on the trigger topic
        marker = await post(client, url, [lead(9, "r")])
        assert marker.status_code == 202, marker.text
    records = await trigger_records(s)
    assert len(records) == 1
    assert records[0].key == b"hubspot-9"
    assert dict(records[0].headers)["af-tenant"] == b"acme"


async def test_broker_down_answers_503_then_the_same_delivery_succeeds(
        own_stack: tuple[EmbeddedStack, StackInfo], tmp_path: Path, rules_workflows: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    embedded, info = own_stack
    monkeypatch.setenv("TEST_CRM_WEBHOOK_SECRET", SECRET)
    (tmp_path / "sources.yaml").write_text(SOURCES)
    s = Settings(bootstrap_servers=info.bootstrap_servers, redis_url=info.redis_url,
                 topic_prefix="down", workflows_dir=rules_workflows,
                 ingress_sources_file=tmp_path / "sources.yaml", ingress_send_timeout_s=2.0)
    topic = TopicNames(s.topic_prefix).trigger("crm")
    await apply_topics(s.bootstrap_servers, [topic], partitions=1, replication_factor=1)
    batch = [lead(1, "d"), lead(2, "d")]
    async with running_ingress(s) as url, httpx.AsyncClient(timeout=30) as client:
        embedded.stop_broker()
        started = time.monotonic()
        down = await post(client, url, batch)
        assert down.status_code == 503, down.text
        assert down.headers["Retry-After"].isdigit()
        assert time.monotonic() - started < 15  # bounded, not the client's timeout
        assert (await client.get(f"{url}/readyz")).status_code == 503
        embedded.start_broker()  # it comes back empty (memory storage)
        await apply_topics(s.bootstrap_servers, [topic], partitions=1, replication_factor=1)
        # the sender delivers again as Retry-After says until the producer has reconnected:
        # every answer until then is 503, never a 202 without the broker's acknowledgement
        answers = [await post(client, url, batch)]
        deadline = time.monotonic() + 60
        while answers[-1].status_code == 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # a sender's back-off (Retry-After), not a sync point
            answers.append(await post(client, url, batch))
        up = answers[-1]
        assert up.status_code == 202, [(a.status_code, a.text) for a in answers]
        assert [e["status"] for e in up.json()["events"]] == ["accepted", "accepted"]
        again = await post(client, url, batch)
        assert again.json()["run_ids"] == up.json()["run_ids"]
    # the events are on the topic; the sends that timed out may have landed too once the
    # broker was back (at-least-once): the same event ids, which start the same runs once
    assert {r.key for r in await trigger_records(s)} == {b"hubspot-1", b"hubspot-2"}


def test_cli_serves_and_stops_cleanly_on_sigterm(stack: StackInfo, tmp_path: Path,
                                                 rules_workflows: Path) -> None:
    (tmp_path / "sources.yaml").write_text(SOURCES)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    env.update(TEST_CRM_WEBHOOK_SECRET=SECRET,
               AGENTFABRIC_BOOTSTRAP_SERVERS=stack.bootstrap_servers,
               AGENTFABRIC_REDIS_URL=stack.redis_url, AGENTFABRIC_TOPIC_PREFIX="cli",
               AGENTFABRIC_WORKFLOWS_DIR=str(rules_workflows),
               AGENTFABRIC_INGRESS_SOURCES_FILE=str(tmp_path / "sources.yaml"))
    log = (tmp_path / "ingress.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "agentfabric", "ingress", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "ingress.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, (tmp_path / "ingress.log").read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "ingress.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
