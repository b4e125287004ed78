"""The local scripted model server for tests: started on a free port, closed at the end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from agents.model_script import ModelScript
from agents.model_server import ModelServerHandle, serve

__all__ = ["models_file", "scripted_server"]


@contextlib.asynccontextmanager
async def scripted_server(script: dict[str, Any]) -> AsyncIterator[ModelServerHandle]:
    handle = await serve(ModelScript.parse(script), port=0)
    try:
        yield handle
    finally:
        await handle.close()


def models_file(folder: Path, url: str, **model: Any) -> Path:
    """A model registry with one provider (the server at ``url``) and model ``local``."""
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({
        "providers": {"local": {"base_url": url}},
        "models": {"local": {"provider": "local", "model": "fabric-local-1", **model}}}))
    return path
