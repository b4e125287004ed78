"""Kafka security settings (SASL, TLS) are validated at start-up and reach every Kafka client."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

import agentfabric.app
import streams.kafka
import streams.topics
from agentfabric.errors import SettingsError, UnavailableError
from agentfabric.ingress import runstore
from agentfabric.settings import Settings, load_settings
from agents.loader import load_workflows
from streams.kafka import Producer, kafka_client_options, make_consumer
from streams.topics import apply_topics

ROOT = Path(__file__).resolve().parents[2]
SASL = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "fabric", "sasl_password": "s3cret"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SECURITY_PROTOCOL", "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD",
                "SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE"):
        monkeypatch.delenv(f"AGENTFABRIC_{var}", raising=False)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key (PEM)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "client.pem", folder / "client.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=agentfabric-test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_plaintext_by_default() -> None:
    s = load_settings()
    assert s.security_protocol == "PLAINTEXT"
    assert kafka_client_options(s) == {"bootstrap_servers": s.bootstrap_servers,
                                       "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"security_protocol": "SASL_SSL"}, "needs AGENTFABRIC_SASL_MECHANISM, "
                                        "AGENTFABRIC_SASL_USERNAME, AGENTFABRIC_SASL_PASSWORD"),
    ({**SASL, "sasl_password": ""}, "needs AGENTFABRIC_SASL_PASSWORD"),
    ({"sasl_username": "fabric"}, "SASL settings are set but security_protocol=PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"},
     "ssl_cafile /no/such/ca.pem is not a readable file"),
    ({"ssl_cafile": str(ROOT / "pyproject.toml")}, "set but security_protocol=PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_cafile": str(ROOT / "pyproject.toml")},
     "cannot build the Kafka TLS context"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI",
      "sasl_username": "u", "sasl_password": "p"}, "AGENTFABRIC_SASL_MECHANISM"),
    ({"security_protocol": "TLS"}, "AGENTFABRIC_SECURITY_PROTOCOL"),
])
def test_invalid_security_settings(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(**overrides)


def test_security_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFABRIC_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("AGENTFABRIC_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("AGENTFABRIC_SASL_USERNAME", "fabric")
    monkeypatch.setenv("AGENTFABRIC_SASL_PASSWORD", "s3cret")
    s = load_settings()
    assert "s3cret" not in repr(s)
    options = kafka_client_options(s)
    assert options["sasl_plain_password"] == "s3cret"
    assert options["sasl_mechanism"] == "PLAIN"
    assert "ssl_context" not in options


def test_sasl_ssl_options(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    s = load_settings(**SASL, ssl_cafile=str(cert), ssl_certfile=str(cert), ssl_keyfile=str(key))
    options = kafka_client_options(s)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_plain_username"] == "fabric"
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_key_must_match_certificate(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = tls_files
    with pytest.raises(SettingsError, match="ssl_keyfile needs ssl_certfile"):
        load_settings(security_protocol="SSL", ssl_keyfile=str(cert))
    bogus = tmp_path / "bogus.key"
    bogus.write_text("not a key")
    with pytest.raises(SettingsError, match="cannot build the Kafka TLS context"):
        load_settings(security_protocol="SSL", ssl_certfile=str(cert), ssl_keyfile=str(bogus))


class _Recorder:
    """Stands in for an aiokafka client class: records the keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *topics: str, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return SimpleNamespace(start=self._fail, close=self._noop, stop=self._noop)

    async def _fail(self) -> None:
        raise KafkaConnectionError("recorded")

    async def _noop(self) -> None:
        return None


def _secured(options: dict[str, Any], settings: Settings) -> None:
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "fabric"
    assert options["sasl_plain_password"] == "s3cret"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["bootstrap_servers"] == settings.bootstrap_servers


async def test_options_reach_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(**SASL)
    producer, consumer, admin, runs = _Recorder(), _Recorder(), _Recorder(), _Recorder()
    monkeypatch.setattr(streams.kafka, "AIOKafkaProducer", producer)
    monkeypatch.setattr(streams.kafka, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(streams.topics, "AIOKafkaAdminClient", admin)
    monkeypatch.setattr(runstore, "AIOKafkaConsumer", runs)

    Producer(s, client_id="x")
    make_consumer(s, "group", "topic")
    runstore._consumer(s, "runs")
    with pytest.raises(UnavailableError):
        await agentfabric.app.provision(
            s, SimpleNamespace(workflows=load_workflows(None)))  # type: ignore[arg-type]
    for recorder in (producer, consumer, admin, runs):
        assert len(recorder.calls) == 1
        _secured(recorder.calls[0], s)
    with pytest.raises(UnavailableError):
        await apply_topics("other:9092", ["t"], partitions=1, replication_factor=1,
                           client_options=kafka_client_options(s))
    assert admin.calls[1]["bootstrap_servers"] == "other:9092"
    assert admin.calls[1]["sasl_plain_password"] == "s3cret"


def test_no_kafka_client_is_built_without_the_helper() -> None:
    """Every place that builds an aiokafka client takes its options from the helper."""
    constructor = re.compile(r"\bAIOKafka(Consumer|Producer|AdminClient)\(")
    offenders = []
    for package in ("agentfabric", "streams", "agents", "tools", "schemas"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for match in constructor.finditer(text):
                call = text[match.end():match.end() + 200]
                if "kafka_client_options(" not in call and "**options" not in call:
                    offenders.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
            if "bootstrap_servers=settings.bootstrap_servers" in text:
                offenders.append(f"{path.relative_to(ROOT)}: bootstrap_servers=settings...")
    assert not offenders, offenders
