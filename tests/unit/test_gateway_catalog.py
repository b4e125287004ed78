"""Where tools come from: YAML files and folders, Python registration, entry points, module
paths, the legacy registry; duplicate names name both sources; the shipped catalog."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from agentfabric.errors import ConfigError
from agentfabric.settings import Settings
from tests.faketools import sample_tools
from tools.gateway.catalog import ENTRY_POINT_GROUP, Catalog, shipped_catalog_dir
from tools.gateway.http import HttpTools
from tools.gateway.spec import ToolSpec


class NoteArgs(BaseModel):
    text: str = Field(min_length=1)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_shipped_catalog_declares_the_sample_services_tools() -> None:
    catalog = Catalog()
    catalog.load_dir(shipped_catalog_dir())
    assert catalog.names() == ["crm.get_account", "crm.update_lead_score", "erp.get_vendor",
                               "erp.post_approval", "erp.validate_invoice"]
    approval = catalog.spec("erp.post_approval")
    assert approval.access == "write"
    assert approval.scopes == ["erp:write"]
    assert approval.approval is not None
    assert approval.approval.when == "args.amount > 10000"
    account = catalog.spec("crm.get_account")
    assert account.http is not None
    assert account.http.path == "/accounts/{domain}"
    assert account.rate_limit is not None
    assert account.rate_limit.limit == 200
    http = HttpTools(Settings().service_urls)
    for spec in catalog.specs():
        assert spec.http is not None
        assert spec.http.service in ("crm", "erp")
        assert spec.scopes
        assert spec.timeout_s
        http.check(spec)  # every service has a URL, every placeholder is a parameter


def test_yaml_file_with_python_implementation(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.yaml", """
        tools:
          - name: notes.add
            access: write
            scopes: [notes:write]
            rate_limit: 5 per minute
            python: tests.unit.test_gateway_catalog:add_note
            parameters: {type: object, required: [text], properties: {text: {type: string}}}
    """)
    catalog = Catalog()
    assert catalog.load_yaml(path) == ["notes.add"]
    spec = catalog.spec("notes.add")
    assert spec.source == str(path)
    assert spec.rate_limit is not None
    assert spec.rate_limit.period_s == 60
    tool = catalog.python("notes.add")
    assert tool.fn is add_note
    assert tool.args_model is NoteArgs
    assert not tool.is_async


def add_note(args: NoteArgs) -> dict[str, Any]:
    return {"added": args.text}


@pytest.mark.parametrize(("text", "problem"), [
    ("tools: {}", "one key"),
    ("- a\n- b", "one key"),
    ("tools: [1]", "a mapping"),
    ("tools:\n  - name: Bad Name", "name"),
    ("tools:\n  - name: x.y\n    access: admin", "access"),
    ("tools:\n  - name: x.y\n    rate_limit: often", "rate"),
    ("tools: [", "not YAML"),
])
def test_invalid_yaml_is_a_config_error(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=problem) as caught:
        Catalog().load_yaml(path)
    assert "bad.yaml" in str(caught.value)


def test_duplicate_names_name_both_sources(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", "tools:\n  - name: crm.get_account\n")
    catalog = Catalog()
    catalog.load_yaml(first)
    with pytest.raises(ConfigError) as caught:
        catalog.register("crm.get_account", NoteArgs)(add_note)
    assert str(first) in str(caught.value)
    assert "test_gateway_catalog" in str(caught.value)


def test_python_registration(tmp_path: Path) -> None:
    catalog = Catalog()

    @catalog.register("notes.get", NoteArgs, description="Read a note.", scopes=["n:read"],
                      timeout_s=2, rate_limit="10/second", redact=["secret"])
    async def get_note(args: NoteArgs, call: Any) -> dict[str, Any]:
        return {"text": args.text}

    spec = catalog.spec("notes.get")
    assert spec.description == "Read a note."
    assert spec.parameters == NoteArgs.model_json_schema()
    assert spec.timeout_s == 2
    assert spec.scopes == ["n:read"]
    assert spec.redact == ["secret"]
    tool = catalog.python("notes.get")
    assert tool.is_async
    assert tool.wants_call
    assert tool.args_model is NoteArgs
    with pytest.raises(ConfigError, match="max_result_bytes"):
        catalog.register("notes.big", NoteArgs, max_result_bytes=1)(add_note)


def test_registry_tools_join_the_catalog(tmp_path: Path) -> None:
    catalog = Catalog()
    catalog.add_registry(sample_tools())
    assert {"crm.get_account", "erp.get_vendor", "erp.validate_invoice"} <= set(catalog.names())
    assert catalog.spec("crm.get_account").source == "tool registry (tests.faketools)"
    assert catalog.python("crm.get_account").args_model.__name__ == "AccountArgs"


def test_module_paths_and_tools_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "mytools_pkg_x"
    package.mkdir()
    write(package / "__init__.py", """
        from pydantic import BaseModel

        class Args(BaseModel):
            n: int

        def double(args: Args) -> int:
            return args.n * 2

        def register(catalog):
            catalog.register("my.double", Args)(double)
    """)
    folder = tmp_path / "catalog"
    folder.mkdir()
    write(folder / "one.yml", "tools:\n  - name: my.one\n    python: mytools_pkg_x:double\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mytools_pkg_x", raising=False)
    settings = Settings(tool_modules=["mytools_pkg_x"], tools_dirs=[folder])
    catalog = Catalog.load(settings, entry_points=False)
    assert {"my.double", "my.one", "crm.get_account"} <= set(catalog.names())
    assert catalog.spec("my.double").source.startswith("python mytools_pkg_x")
    with pytest.raises(ConfigError, match="cannot import tool module"):
        Catalog.load(Settings(tool_modules=["no_such_module_zz"]), entry_points=False)
    with pytest.raises(ConfigError, match="does not exist"):
        Catalog.load(Settings(tools_dirs=[tmp_path / "nowhere"]), entry_points=False)


class FakeEntryPoint:
    def __init__(self, name: str, target: Any) -> None:
        self.name, self.value, self._target = name, f"plugin:{name}", target

    def load(self) -> Any:
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    def register(catalog: Catalog) -> None:
        catalog.add(ToolSpec(name="plugin.ping", source="entry point plugin"))

    seen: list[str] = []

    def entry_points(group: str) -> list[FakeEntryPoint]:
        seen.append(group)
        return [FakeEntryPoint("ping", register)]

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    catalog = Catalog.load(Settings())
    assert "plugin.ping" in catalog.names()
    assert seen == [ENTRY_POINT_GROUP]
    monkeypatch.setattr("importlib.metadata.entry_points",
                        lambda group: [FakeEntryPoint("broken", ImportError("no numpy"))])
    with pytest.raises(ConfigError, match=r"broken.*no numpy"):
        Catalog.load(Settings())


def test_python_tool_import_problems_and_unknown_fallback() -> None:
    catalog = Catalog.of([ToolSpec(name="x.missing", python="no_such_mod_q:fn"),
                          ToolSpec(name="x.none")])
    with pytest.raises(ConfigError, match="cannot import"):
        catalog.python("x.missing")
    with pytest.raises(ConfigError, match="no implementation"):
        catalog.python("x.none")
    with pytest.raises(ConfigError, match=r"no tool named 'x.other'"):
        catalog.spec("x.other")
    broken = Catalog.of([ToolSpec(name="x.a", fallback={"tool": "x.b"})])
    with pytest.raises(ConfigError, match=r"falls back to 'x.b'"):
        broken.check()


def test_http_check_names_the_missing_service_and_placeholder() -> None:
    http = HttpTools({"crm": "http://127.0.0.1:1"})
    with pytest.raises(ConfigError, match="service_urls"):
        http.check(ToolSpec(name="x.a", http={"service": "billing", "path": "/a"}))
    with pytest.raises(ConfigError, match=r"\{id\}"):
        http.check(ToolSpec(name="x.b", http={"service": "crm", "path": "/a/{id}"}))
