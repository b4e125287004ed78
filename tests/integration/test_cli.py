"""The command line, as a user runs it: up/down by pid, port errors, publish, results, dlq."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentfabric.settings import Settings
from streams.embedded import free_port, pid_alive

from .helpers import collect_dead_letters, collect_results, running_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    return subprocess.run([sys.executable, "-m", "agentfabric", *args],
                          env={**clean, **(env or {})}, input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def settings_env(settings: Settings) -> dict[str, str]:
    return {"AGENTFABRIC_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "AGENTFABRIC_REDIS_URL": settings.redis_url,
            "AGENTFABRIC_TOPIC_PREFIX": settings.topic_prefix,
            "AGENTFABRIC_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
            "AGENTFABRIC_WORKFLOWS_DIR": str(settings.workflows_dir),
            "AGENTFABRIC_SERVICE_URLS": json.dumps(settings.service_urls)}


def test_help_lists_the_commands() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("up", "down", "topics", "publish", "results", "dlq", "worker", "demo"):
        assert command in result.stdout


def test_up_and_down_manage_exactly_their_processes(tmp_path: Path) -> None:
    env = {"AGENTFABRIC_STATE_DIR": str(tmp_path), "AGENTFABRIC_BROKER_PORT": str(free_port()),
           "AGENTFABRIC_REDIS_PORT": str(free_port()), "AGENTFABRIC_CRM_PORT": str(free_port()),
           "AGENTFABRIC_ERP_PORT": str(free_port())}
    up = cli("up", env=env)
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "stack.json").read_text())
    broker, redis = state["broker"], state["redis"]
    services = state["services"]
    try:
        assert pid_alive(broker["pid"], broker["binary"])
        assert pid_alive(redis["pid"], redis["binary"])
        for proc in services.values():
            assert pid_alive(proc["pid"], proc["binary"])
        assert f"export AGENTFABRIC_BOOTSTRAP_SERVERS=127.0.0.1:{broker['port']}" in up.stdout
        again = cli("up", env=env)
        assert again.returncode == 1
        assert "already running" in again.stderr
    finally:
        down = cli("down", env=env)
    assert down.returncode == 0, down.stderr
    assert f"stopped broker (pid {broker['pid']})" in down.stdout
    assert not pid_alive(broker["pid"], broker["binary"])
    assert not pid_alive(redis["pid"], redis["binary"])
    for proc in services.values():
        assert not pid_alive(proc["pid"], proc["binary"])
    assert cli("down", env=env).stdout.startswith("nothing to stop")


def test_port_in_use_names_the_port_and_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("up", env={"AGENTFABRIC_STATE_DIR": str(tmp_path),
                                "AGENTFABRIC_BROKER_PORT": str(port),
                                "AGENTFABRIC_REDIS_PORT": str(free_port()),
                                "AGENTFABRIC_CRM_PORT": str(free_port()),
                                "AGENTFABRIC_ERP_PORT": str(free_port())})
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use; set AGENTFABRIC_BROKER_PORT" in \
        result.stderr.replace("\n", " ")
    assert not (tmp_path / "stack.json").exists()


def test_publish_validates_before_sending(tmp_path: Path) -> None:
    events = tmp_path / "events.json"
    events.write_text(json.dumps([{"event_type": "lead.created", "payload": {}},
                                  {"event_type": "lead.created"}]))
    # nothing listens on this broker address: validation must fail before any connection
    result = cli("publish", "crm", str(events),
                 env={"AGENTFABRIC_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    assert result.returncode == 1
    assert "nothing was sent; event 2: payload: Field required" in \
        result.stderr.replace("\n", " ")


async def test_publish_results_and_dlq_commands(settings: Settings) -> None:
    env = settings_env(settings)
    async with running_worker(settings):
        lines = "\n".join(json.dumps({"event_type": "lead.created", "event_id": f"cli-{i}",
                                      "payload": {"lead_id": f"L{i}",
                                                  "email": f"p{i}@contoso.com"}})
                          for i in range(3))
        published = cli("publish", f"{settings.topic_prefix}.triggers.crm", "-", env=env,
                        stdin=lines + "\n")
        assert published.returncode == 0, published.stderr
        assert "published 3 events" in published.stdout
        bad = cli("publish", "crm", "-", env=env,
                  stdin=json.dumps({"event_type": "lead.nope", "payload": {}}))
        assert bad.returncode == 0, bad.stderr  # valid shape; no workflow takes it
        assert len(await collect_results(settings, "lead_enrichment", 3)) == 3
        [letter] = await collect_dead_letters(settings, 1)
    table = cli("results", "lead_enrichment", env=env)
    assert table.returncode == 0, table.stderr
    assert "lead_enrichment: 3 results" in table.stdout
    as_json = cli("results", "lead_enrichment", "--json", env=env)
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert sorted(r["event_id"] for r in rows) == ["cli-0", "cli-1", "cli-2"]
    listed = cli("dlq", "list", "--json", env=env)
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["dead_letter_id"] == letter.dead_letter_id
    shown = cli("dlq", "show", letter.dead_letter_id[:8], env=env)
    assert shown.returncode == 0, shown.stderr
    assert "no workflow starts on event type 'lead.nope'" in shown.stdout.replace("\n", " ")
    assert '"lead.nope"' in shown.stdout
    missing = cli("dlq", "show", "zzzz", env=env)
    assert missing.returncode == 2
    assert "no dead letters match 'zzzz'" in missing.stderr


async def test_topics_apply_creates_every_topic_with_configured_partitions(
        settings: Settings) -> None:
    from aiokafka import AIOKafkaConsumer

    env = {**settings_env(settings), "AGENTFABRIC_PARTITIONS": "2"}
    first = cli("topics", "apply", env=env)
    assert first.returncode == 0, first.stderr
    expected = cli("topics", "list", env=env).stdout.split()
    assert f"{settings.topic_prefix}.lead_enrichment.enrich" in expected
    assert f"{settings.topic_prefix}.results.invoice_triage" in expected
    assert f"{settings.topic_prefix}.dlq" in expected
    assert sorted(line.split()[-1] for line in first.stdout.splitlines()) == sorted(expected)
    assert all(line.startswith("created") for line in first.stdout.splitlines())
    again = cli("topics", "apply", env=env)
    assert all(line.startswith("exists") for line in again.stdout.splitlines())
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        await consumer.topics()
        for topic in expected:
            assert consumer.partitions_for_topic(topic) == {0, 1}, topic
    finally:
        await consumer.stop()


def test_eval_runs_cases_through_the_fabric_and_flags_regressions(
        settings: Settings, tmp_path: Path) -> None:
    import yaml

    env = settings_env(settings)
    shipped = Path(__file__).parents[2] / "agentfabric/examples/evals/lead_enrichment.yaml"
    first = cli("eval", "lead_enrichment", str(shipped), "--report", str(tmp_path / "r.json"),
                env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pass rate 100% (4 cases)" in first.stdout
    baseline = json.loads((tmp_path / "r.json").read_text())
    assert all(c["latency_ms"] > 0 for c in baseline["cases"])
    broken = yaml.safe_load(shipped.read_text())
    broken["cases"][0]["expect"][0]["equals"]["value"] = "warm"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    again = cli("eval", "lead_enrichment", str(tmp_path / "broken.yaml"), "--baseline",
                str(tmp_path / "r.json"), env=env)
    assert again.returncode == 1
    assert "regression: case 'enterprise software VP is hot' passed in the baseline and " \
           "fails now: segment is 'hot', expected 'warm'" in again.stdout.replace("\n", " ")


def test_kb_ingest_and_search(tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("Our cold-chain partner moves vaccines in refrigerated trucks.\n\n"
                     "The cafeteria menu changes every Tuesday.")
    env = {"AGENTFABRIC_VECTOR_DIR": str(tmp_path / "vectors")}
    docs = Path(__file__).parents[2] / "tools/data/kb/retrieval_docs.jsonl"
    ingest = cli("kb", "ingest", "Notes", str(docs), str(notes), "--tenant", "acme", env=env)
    assert ingest.returncode == 0, ingest.stderr
    assert "stored 67 documents in Notes for tenant acme" in ingest.stdout
    found = cli("kb", "search", "Notes", "vaccine logistics", "--tenant", "acme", "-k", "2",
                "--json", env=env)
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert {h["id"] for h in hits} == {"doc-001", "notes-0"}
    assert cli("kb", "search", "Notes", "vaccine logistics", "--tenant", "other",
               env=env).stdout == ""
