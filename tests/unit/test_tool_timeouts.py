"""Tool calls stay off the event loop and are bounded in time.

Sync tools run in worker threads, so the loop keeps serving other coroutines while one
blocks; every call the engine makes (a tool step's, or one a model asks for in an llm step)
fails as transient past the step's ``tool_timeout_s``, else the engine's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from agentfabric.errors import ConfigError, ToolError, TransientError
from agents.engine import Engine
from agents.loader import parse_workflow
from agents.model_server import ModelServerHandle
from agents.models import ModelClient, ModelRegistry
from agents.workflow import WorkflowSet
from schemas.models import RunResult, StepMessage, TriggerEvent
from tests.modelfixture import scripted_server
from tools.registry import ToolCall, ToolRegistry

pytestmark = pytest.mark.timeout(30)

CALL = ToolCall(tool="t", idempotency_key="r1:s:0", tenant="acme", run_id="r1")


class Wait(BaseModel):
    seconds: float


class SlowTools:
    """A registry of deliberately slow tools. Each waits on ``gate`` for at most its
    ``seconds``; ``release`` ends every wait, so no thread outlives its test."""

    def __init__(self) -> None:
        self.registry = ToolRegistry()
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.registry.register("slow.wait", Wait)(self.wait)
        self.registry.register("slow.async_wait", Wait)(self.async_wait)

    def wait(self, args: Wait) -> dict[str, Any]:
        """Blocks its thread for up to ``seconds``."""
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return {"released": self.gate.wait(args.seconds),
                    "on_loop_thread": _running_loop_here()}
        finally:
            with self.lock:
                self.in_flight -= 1

    async def async_wait(self, args: Wait) -> dict[str, Any]:
        """Waits for up to ``seconds`` without blocking the loop."""
        await asyncio.sleep(args.seconds)
        return {"slept": args.seconds}

    def release(self) -> None:
        self.gate.set()


def _running_loop_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
async def slow() -> AsyncIterator[SlowTools]:
    """Async, so it is released before the loop shuts down its threads."""
    tools = SlowTools()
    try:
        yield tools
    finally:
        tools.release()


# --- the registry: sync tools in threads -------------------------------------------------

async def test_a_blocking_sync_tool_leaves_the_loop_free(slow: SlowTools) -> None:
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocker(args: Wait) -> dict[str, Any]:
        loop.call_soon_threadsafe(started.set)
        return {"released": slow.gate.wait(args.seconds)}

    slow.registry.register("slow.blocker", Wait)(blocker)
    call = asyncio.create_task(slow.registry.call("slow.blocker", {"seconds": 20}, CALL))
    # Only a free loop can see the tool start and release it; on the loop the tool would
    # hold it for its full 20 s and come back unreleased.
    await asyncio.wait_for(started.wait(), 10)
    slow.release()
    assert await asyncio.wait_for(call, 10) == {"released": True}


async def test_sync_tools_run_side_by_side_in_threads(slow: SlowTools) -> None:
    calls = 4
    barrier = threading.Barrier(calls, timeout=10)

    def meet(args: Wait) -> bool:
        barrier.wait()  # passes only once all the calls are inside at the same time
        return _running_loop_here()

    slow.registry.register("slow.meet", Wait)(meet)
    results = await asyncio.gather(*(slow.registry.call("slow.meet", {"seconds": 0}, CALL)
                                     for _ in range(calls)))
    assert results == [False] * calls  # none ran on the loop's thread
    assert not barrier.broken


async def test_an_async_tool_is_awaited_on_the_loop() -> None:
    registry = ToolRegistry()

    async def here(args: Wait) -> bool:
        return _running_loop_here()

    registry.register("loop.here", Wait)(here)
    assert registry.get("loop.here").is_async
    assert await registry.call("loop.here", {"seconds": 0}, CALL) is True


async def test_a_sync_tool_error_is_still_a_tool_error() -> None:
    registry = ToolRegistry()

    def broken(args: Wait) -> None:
        raise ZeroDivisionError("boom")

    registry.register("broken", Wait)(broken)
    with pytest.raises(ToolError, match="tool 'broken' failed with ZeroDivisionError: boom"):
        await registry.call("broken", {"seconds": 0}, CALL)


# --- the engine: a timeout on every tool call --------------------------------------------

def tool_workflow(tool: str, seconds: float, step_timeout: float | None) -> WorkflowSet:
    step: dict[str, Any] = {"id": "call", "kind": "tool", "tool": tool,
                            "args": {"seconds": seconds}}
    if step_timeout is not None:
        step["tool_timeout_s"] = step_timeout
    doc = {"name": "slow_tool", "version": 1,
           "trigger": {"source": "crm", "event_types": ["slow"]}, "steps": [step]}
    return WorkflowSet([parse_workflow(doc, "slow_tool.yaml")])


def first_message(engine: Engine) -> StepMessage:
    [message] = engine.start(TriggerEvent(source="crm", event_type="slow", payload={}))
    return message


@pytest.mark.parametrize("tool", ["slow.wait", "slow.async_wait"])
async def test_a_tool_slower_than_the_timeout_fails_as_transient_in_about_the_timeout(
        slow: SlowTools, tool: str) -> None:
    engine = Engine(tool_workflow(tool, 20, None), slow.registry, tool_timeout_s=0.2)
    began = time.monotonic()
    with pytest.raises(TransientError, match=rf"tool '{tool}' \(step 'call'\) did not answer "
                                             r"within 0.2 s, so the step will be retried; "
                                             r"raise the step's tool_timeout_s"):
        await engine.run_step(first_message(engine))
    assert 0.15 <= time.monotonic() - began < 2.0


@pytest.mark.parametrize(("engine_s", "step_s", "passes"), [
    (0.1, 30.0, True),    # the step allows more than the engine default
    (30.0, 0.1, False),   # the step allows less
])
async def test_the_steps_tool_timeout_wins_over_the_engines(
        slow: SlowTools, engine_s: float, step_s: float, passes: bool) -> None:
    engine = Engine(tool_workflow("slow.wait", 0.4, step_s), slow.registry,
                    tool_timeout_s=engine_s)
    assert engine.tool_timeout_for(engine.workflows.latest("slow_tool").step("call")) == step_s
    if passes:
        result = await engine.advance(first_message(engine))
        assert isinstance(result, RunResult)
        assert result.output == {"released": False, "on_loop_thread": False}
    else:
        with pytest.raises(TransientError, match=r"within 0.1 s"):
            await engine.run_step(first_message(engine))


def test_the_engine_default_is_thirty_seconds_and_must_be_positive(slow: SlowTools) -> None:
    workflows = tool_workflow("slow.wait", 0, None)
    engine = Engine(workflows, slow.registry)
    assert engine.tool_timeout_for(workflows.latest("slow_tool").step("call")) == 30.0
    with pytest.raises(ConfigError, match="tool_timeout_s must be positive"):
        Engine(workflows, slow.registry, tool_timeout_s=0)


# --- an llm step's model-requested tool calls ---------------------------------------------

SCRIPT = {"rules": [{"match": {"workflow": "slow_llm", "step": "ask"}, "turns": [
    {"tool_calls": [{"name": "slow.wait", "arguments": {"seconds": 20}}]},
    {"content": "done"}]}]}


@pytest.fixture
async def server() -> AsyncIterator[ModelServerHandle]:
    async with scripted_server(SCRIPT) as handle:
        yield handle


@pytest.fixture
async def models(server: ModelServerHandle) -> AsyncIterator[ModelClient]:
    registry = ModelRegistry.model_validate({
        "providers": {"local": {"base_url": server.url}},
        "models": {"local-test": {"provider": "local", "model": "fabric-local-1"}}})
    client = ModelClient(registry, timeout_s=5, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.parametrize(("engine_s", "step_s"), [(0.2, None), (30.0, 0.2)])
async def test_a_tool_call_the_model_asks_for_honours_the_timeout(
        slow: SlowTools, models: ModelClient, engine_s: float, step_s: float | None) -> None:
    step: dict[str, Any] = {"id": "ask", "kind": "llm", "model": "local-test",
                            "prompt": "wait, then say done", "tools": ["slow.wait"]}
    if step_s is not None:
        step["tool_timeout_s"] = step_s
    doc = {"name": "slow_llm", "version": 1,
           "trigger": {"source": "crm", "event_types": ["slow"]}, "steps": [step]}
    engine = Engine(WorkflowSet([parse_workflow(doc, "slow_llm.yaml")]), slow.registry,
                    models=models, tool_timeout_s=engine_s)
    began = time.monotonic()
    with pytest.raises(TransientError, match=r"tool 'slow.wait' \(step 'ask'\) did not answer "
                                             r"within 0.2 s"):
        await engine.run_step(first_message(engine))
    assert time.monotonic() - began < 5.0
    assert slow.peak == 1  # the model's call reached the tool before the limit


async def test_an_llm_step_tool_call_within_the_timeout_is_answered(
        slow: SlowTools, models: ModelClient) -> None:
    slow.release()  # the tool answers at once
    doc = {"name": "slow_llm", "version": 1,
           "trigger": {"source": "crm", "event_types": ["slow"]},
           "steps": [{"id": "ask", "kind": "llm", "model": "local-test", "prompt": "go",
                      "tools": ["slow.wait"], "tool_timeout_s": 5}]}
    engine = Engine(WorkflowSet([parse_workflow(doc, "slow_llm.yaml")]), slow.registry,
                    models=models, tool_timeout_s=0.001)
    result = await engine.advance(first_message(engine))
    assert isinstance(result, RunResult)
    assert result.output == "done"
    assert result.usage.tool_calls == 1
