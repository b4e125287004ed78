"""A worker process for the fault suite: ``python -m tests.faults.worker_main``.

It is ``agentfabric worker`` (settings from ``AGENTFABRIC_*``, the engine as
``agentfabric.app.build_engine`` builds it, SIGTERM drains) with one more tool,
``faults.apply``: an async HTTP call to the side-effect service at ``$FAULTS_SERVICE_URL``
that sends the tool call's idempotency key in the ``Idempotency-Key`` header and returns the
service's JSON. A refused connection, a timeout or a 5xx is a TransientError (the step goes
to its retry tiers); a 4xx is a ToolError (dead-lettered at once).

Every second it logs ``processed N`` so a test can read progress from a worker it kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel

from agentfabric.app import build_engine as app_build_engine
from agentfabric.app import setup_logging
from agentfabric.errors import AgentFabricError, ToolError, TransientError
from agentfabric.settings import Settings, load_settings
from agentfabric.worker import Worker
from agents.engine import Engine
from tools import ToolCall, ToolRegistry

__all__ = ["IDEMPOTENCY_HEADER", "SERVICE_ENV", "Apply", "HttpApplyTool", "build_engine",
           "main"]

SERVICE_ENV = "FAULTS_SERVICE_URL"
IDEMPOTENCY_HEADER = "Idempotency-Key"
log = logging.getLogger("tests.faults.worker")


class Apply(BaseModel):
    subject: str
    amount: float = 0.0


class HttpApplyTool:
    """POST /apply to the side-effect service; one aiohttp session per process."""

    def __init__(self, base_url: str) -> None:
        self.url = base_url.rstrip("/") + "/apply"
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, args: Apply, call: ToolCall) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        body = {"subject": args.subject, "amount": args.amount, "run_id": call.run_id}
        try:
            async with self._session.post(
                    self.url, json=body, headers={IDEMPOTENCY_HEADER: call.idempotency_key},
            ) as response:
                if response.status >= 500 or response.status == 429:
                    raise TransientError(f"the side-effect service answered {response.status}; "
                                         f"the step is retried")
                if response.status >= 400:
                    raise ToolError(f"the side-effect service refused the call "
                                    f"({response.status}: {(await response.text())[:200]})")
                result: dict[str, Any] = await response.json()
                return result
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise TransientError(f"the side-effect service at {self.url} is unreachable "
                                 f"({type(exc).__name__}); the step is retried") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def build_engine(settings: Settings, tool: HttpApplyTool) -> Engine:
    """``agentfabric.app.build_engine`` with ``faults.apply`` added to the tools (a Python
    tool, called through the tool gateway like every other)."""
    tools = ToolRegistry()
    tools.register("faults.apply", Apply, "Apply a side effect once per idempotency key.")(tool)
    return app_build_engine(settings, tools=tools)


async def _report(worker: Worker) -> None:
    """``processed N`` each second; when nothing finished for two seconds while many tasks
    wait, also where they wait (the innermost frames), for a post-mortem of a stall."""
    last, still = -1, 0
    while True:
        await asyncio.sleep(1.0)
        log.info("processed %d", worker.processed)
        still = still + 1 if worker.processed == last else 0
        last = worker.processed
        tasks = asyncio.all_tasks()
        if still >= 2 and len(tasks) > 80:  # an idle worker has ~50
            where: Counter[str] = Counter()
            for task in tasks:
                stack = task.get_stack()
                if stack:
                    code = stack[-1].f_code
                    where[f"{Path(code.co_filename).name}:{code.co_name}:"
                          f"{stack[-1].f_lineno}"] += 1
            log.info("stalled for %ds, %d tasks waiting in: %s", still, len(tasks),
                     ", ".join(f"{k} x{n}" for k, n in where.most_common(8)))


async def serve(settings: Settings) -> None:
    """Run the worker until SIGTERM/SIGINT (the loop of ``agentfabric worker``)."""
    tool = HttpApplyTool(os.environ.get(SERVICE_ENV, "http://127.0.0.1:9"))
    worker = Worker(settings, build_engine(settings, tool))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(worker.run(stop))
    reporter = asyncio.create_task(_report(worker))
    try:
        await asyncio.wait([task, asyncio.create_task(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait_for(task, settings.shutdown_timeout_s)
        task.result()
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        await tool.close()


def main() -> int:
    setup_logging("INFO")
    try:
        asyncio.run(serve(load_settings()))
    except AgentFabricError as exc:
        log.error("worker failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
