"""`agentfabric settings` prints each setting in the form its variable takes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from agentfabric.cli import app


def test_settings_print_json_for_objects_masked_secrets_and_empty_for_unset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFABRIC_TRIGGER_TENANTS", '{"crm": {"fixed": "acme"}}')
    monkeypatch.setenv("AGENTFABRIC_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("AGENTFABRIC_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("AGENTFABRIC_SASL_USERNAME", "svc")
    monkeypatch.setenv("AGENTFABRIC_SASL_PASSWORD", "hunter2-secret")
    monkeypatch.delenv("AGENTFABRIC_WEAVIATE_URL", raising=False)
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert "hunter2-secret" not in result.output
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1].split("    # ")[0]
             for line in result.output.splitlines() if line.startswith("AGENTFABRIC_")}
    tenants = json.loads(lines["AGENTFABRIC_TRIGGER_TENANTS"])
    assert tenants["crm"]["fixed"] == "acme"
    assert json.loads(lines["AGENTFABRIC_RETRY_TIERS_S"]) == [1.0, 10.0, 60.0, 600.0]
    assert lines["AGENTFABRIC_SASL_PASSWORD"] == "**********"
    assert lines["AGENTFABRIC_WEAVIATE_URL"] == ""
