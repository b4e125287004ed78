"""The runs the MCP server starts, and the status of any run.

A run is started and awaited with :meth:`agentfabric.client.Client.run` (its first step
message on the first step's topic, then request-reply on the workflow's result topic). The
runs this process started are kept in memory (the newest ``keep``): the result once it came,
or only the run id when the call timed out. The status of any other run, or of one that
timed out here, is the last result with that run id on a loaded workflow's result topic
(read from the start with ``streams.reader``); a run with no result there is unknown.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agents.workflow import WorkflowSet
from schemas.models import RunResult, utc_now
from schemas.serde import decode
from streams.reader import read_topic
from streams.topics import TopicNames

from .client import Client
from .errors import AgentFabricError, ConfigError, RunTimeoutError
from .settings import Settings

__all__ = ["RunRecord", "RunTracker", "run_view"]


@dataclass
class RunRecord:
    """A run this process started: its result, or None while none has been seen."""

    run_id: str
    workflow: str
    tenant: str
    started_at: datetime
    result: RunResult | None = None

    @property
    def status(self) -> str:
        return "running" if self.result is None else self.result.status


def run_view(result: RunResult) -> dict[str, Any]:
    """What a client sees of a finished run (the step context stays on the topic)."""
    data = result.model_dump(mode="json", exclude={"context", "trace_parent"})
    return {"run_id": data.pop("run_id"), "workflow": data.pop("workflow"),
            "status": data.pop("status"), "output": data.pop("output"), **data}


class RunTracker:
    """Starts runs through ``client`` and remembers them; ``lookup`` finds any run."""

    def __init__(self, settings: Settings, client: Client, workflows: WorkflowSet, *,
                 keep: int = 10_000) -> None:
        self.settings = settings
        self.client = client
        self.workflows = workflows
        self.names = TopicNames(settings.topic_prefix)
        self.keep = keep
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()

    async def run(self, workflow: str, payload: Mapping[str, Any], tenant: str,
                  timeout_s: float) -> RunRecord:
        """Run the latest version of ``workflow`` on ``payload`` and wait up to ``timeout_s``
        for its result (the record's ``result`` is None if none came)."""
        started = utc_now()
        try:
            result = await self.client.run(workflow, payload, tenant=tenant, timeout=timeout_s)
        except RunTimeoutError as exc:
            return self._remember(RunRecord(exc.run_id, exc.workflow, tenant, started))
        return self._remember(RunRecord(result.run_id, result.workflow, tenant, started,
                                        result))

    def _remember(self, record: RunRecord) -> RunRecord:
        self.runs[record.run_id] = record
        while len(self.runs) > self.keep:
            self.runs.popitem(last=False)
        return record

    async def lookup(self, run_id: str) -> dict[str, Any] | None:
        """The latest known state of ``run_id``, or None if no result of it is known and
        this process did not start it."""
        record = self.runs.get(run_id)
        if record is not None and record.result is not None:
            return run_view(record.result)
        result = await self._find(run_id, [record.workflow] if record is not None
                                  else self.workflows.names())
        if result is not None:
            if record is not None:
                record.result = result
            return run_view(result)
        if record is not None:
            return {"run_id": run_id, "workflow": record.workflow, "status": "running",
                    "tenant": record.tenant, "started_at": record.started_at.isoformat()}
        return None

    async def _find(self, run_id: str, workflows: list[str]) -> RunResult | None:
        """The last result of ``run_id`` on the result topic of one of ``workflows``."""
        key = run_id.encode()
        for name in workflows:
            found: RunResult | None = None
            try:
                async for message in read_topic(self.settings, self.names.results(name)):
                    if message.key == key:
                        with contextlib.suppress(AgentFabricError):  # unreadable: not it
                            found = decode(message.value, message.headers, RunResult)
            except ConfigError:
                continue  # no result topic yet: no results either
            if found is not None:
                return found
        return None
