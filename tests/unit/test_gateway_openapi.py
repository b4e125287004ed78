"""Importing tools from an OpenAPI document (the shipped sample CRM document), and the
``agentfabric tools`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from agentfabric.cli import app
from agentfabric.errors import ConfigError
from tools.gateway.catalog import Catalog, shipped_catalog_dir
from tools.gateway.openapi import catalog_yaml, import_operations, load_document, tool_name
from tools.gateway.spec import ToolSpec

CRM_OPENAPI = shipped_catalog_dir() / "openapi" / "crm.openapi.yaml"


@pytest.fixture
def document() -> dict[str, Any]:
    return load_document(CRM_OPENAPI)


def test_import_matches_the_shipped_catalog(document: dict[str, Any]) -> None:
    imported = import_operations(document, ["crm.get_account", "crm.update_lead_score"],
                                 service="crm")
    shipped = Catalog()
    shipped.load_dir(shipped_catalog_dir())
    for spec in imported:
        declared = shipped.spec(spec.name)
        assert spec.access == declared.access
        assert spec.http == declared.http
        assert set(spec.parameters["properties"]) == set(declared.parameters["properties"])
        assert set(spec.parameters["required"]) == set(declared.parameters["required"])
    score = imported[1]
    assert score.access == "write"
    assert score.parameters["additionalProperties"] is False
    owner = score.parameters["properties"]["owner"]  # a $ref, OpenAPI 3.0 nullable
    assert owner["type"] == ["string", "null"]
    assert "nullable" not in owner
    assert score.parameters["properties"]["lead_id"]["description"] == \
        "The lead's id in the CRM."  # a path-level $ref parameter
    assert "X-Tenant" not in score.parameters["properties"]  # headers are the gateway's
    assert score.description.startswith("Record a lead's score")


def test_yaml_round_trip(document: dict[str, Any], tmp_path: Path) -> None:
    specs = import_operations(document, ["crm.get_lead"], url="http://crm.internal:8080")
    path = tmp_path / "crm.yaml"
    path.write_text(catalog_yaml(specs), encoding="utf-8")
    catalog = Catalog()
    catalog.load_yaml(path)
    loaded = catalog.spec("crm.get_lead")
    assert loaded.model_dump(exclude={"source"}) == specs[0].model_dump(exclude={"source"})
    assert loaded.http is not None
    assert loaded.http.url == "http://crm.internal:8080"


def test_openapi_dialect_and_refs() -> None:
    document = {
        "openapi": "3.0.0", "paths": {"/items/{id}": {"put": {
            "operationId": "Items.Update", "parameters": [
                {"name": "id", "in": "path", "schema": {"type": "integer"}},
                {"name": "dry", "in": "query", "required": True,
                 "schema": {"type": "boolean", "example": True}}],
            "requestBody": {"$ref": "#/components/requestBodies/Item"}}}},
        "components": {
            "requestBodies": {"Item": {"required": True, "content": {"application/json": {
                "schema": {"type": "array", "items": {"$ref": "#/components/schemas/P"}}}}}},
            "schemas": {"P": {"type": "object", "properties": {
                "price": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "nullable": {"type": "string"}}}}}}
    [spec] = import_operations(document, ["Items.Update"], service="inv")
    assert spec.name == "items.update"
    assert spec.access == "write"
    params = spec.parameters
    assert params["required"] == ["id", "dry", "body"]
    assert params["properties"]["dry"]["examples"] == [True]
    item = params["properties"]["body"]["items"]
    assert item["properties"]["price"] == {"type": "number", "exclusiveMinimum": 0}
    assert "nullable" in item["properties"]  # a property named like a keyword stays


def test_import_errors(document: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no operation crm.nope.*crm.get_account"):
        import_operations(document, ["crm.nope"], service="crm")
    with pytest.raises(ConfigError, match="exactly one"):
        import_operations(document, ["crm.get_account"])
    recursive = {"openapi": "3.1.0", "paths": {"/a": {"post": {
        "operationId": "a", "requestBody": {"content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/N"}}}}}}},
        "components": {"schemas": {"N": {"type": "object", "properties": {
            "next": {"$ref": "#/components/schemas/N"}}}}}}
    with pytest.raises(ConfigError, match="refers to itself"):
        import_operations(recursive, ["a"], service="x")
    not_openapi = tmp_path / "x.json"
    not_openapi.write_text(json.dumps({"swagger": "2.0"}))
    with pytest.raises(ConfigError, match="not an OpenAPI 3"):
        load_document(not_openapi)
    assert tool_name("Get Account/ById") == "get_account_byid"
    assert tool_name("123") == "op_123"


def test_cli_import_openapi(tmp_path: Path) -> None:
    out = tmp_path / "crm.yaml"
    result = CliRunner().invoke(app, [
        "tools", "import-openapi", str(CRM_OPENAPI), "--select", "crm.get_account",
        "--select", "crm.get_lead", "--service", "crm", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 tool(s)" in result.output
    tools = yaml.safe_load(out.read_text())["tools"]
    assert [t["name"] for t in tools] == ["crm.get_account", "crm.get_lead"]
    assert all(ToolSpec.model_validate(t).http is not None for t in tools)
    printed = CliRunner().invoke(app, ["tools", "import-openapi", str(CRM_OPENAPI),
                                       "-s", "crm.get_lead", "--url", "http://x"])
    assert printed.exit_code == 0
    assert "url: http://x" in printed.output


def test_cli_tools_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    result = CliRunner().invoke(app, ["tools", "list", "--json", "--no-state"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in map(json.loads, result.output.splitlines())}
    approval = rows["erp.post_approval"]
    assert approval["access"] == "write"
    assert approval["scopes"] == "erp:write"
    assert approval["rate_limit"] == "50/1s"
    assert approval["approval"] == "args.amount > 10000"
    assert approval["breaker"] == "3 in 60s, open 30s"
    assert approval["breaker_state"] == "-"
    assert approval["source"].endswith("erp.yaml")
