"""The local scripted model server for tests: started on a free port, closed at the end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from agents.model_script import ModelScript
from agents.model_server import ModelServerHandle, serve

__all__ = ["FIT_RULE", "fit_check", "models_file", "scripted_server", "workflow_folder"]


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


# fit_check: an llm step that looks the lead's account up in the sample CRM and judges the
# fit, then a transform that labels it (tests add steps or flags to it)
FIT_RULE: dict[str, Any] = {
    "match": {"workflow": "fit_check"},
    "turns": [{"tool_calls": [{"name": "crm.get_account",
                               "arguments": {"domain": "{{ user_json.domain }}"}}]},
              {"content": {"fit": "{{ 'high' if tool_results[-1].employees >= 1000 "
                                  "else 'low' }}",
                           "account": "{{ tool_results[-1].name }}"}}]}


def fit_check(*more_steps: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """The fit_check workflow: steps fit (llm) and label (transform), then ``more_steps``."""
    return {
        "name": "fit_check", "version": 1, **flags,
        "trigger": {"source": "crm", "event_types": ["lead.created"]},
        "steps": [
            {"id": "fit", "kind": "llm", "model": "local", "prompt_file": "fit.md",
             "tools": ["crm.get_account"], "max_iterations": 3,
             "output_schema": {"type": "object", "required": ["fit", "account"]}},
            {"id": "label", "kind": "transform",
             "output": "{{ steps.fit.account + ': ' + steps.fit.fit }}"},
            *more_steps,
        ],
    }


def workflow_folder(folder: Path, workflow: dict[str, Any], model_url: str,
                    **model: Any) -> dict[str, Path]:
    """``folder``/workflows with ``workflow`` (and fit.md, its prompt) and a models file
    for the server at ``model_url``: the settings fields to update."""
    workflows = folder / "workflows"
    workflows.mkdir()
    (workflows / "fit.md").write_text('{"domain": "{{ input.domain }}"}')
    (workflows / f"{workflow['name']}.yaml").write_text(yaml.safe_dump(workflow))
    return {"workflows_dir": workflows, "models_file": models_file(folder, model_url, **model)}
