"""Durable calls inside a step: model calls, tool calls (refusals too) and lookups are
journaled as they complete and answered from the journal when the step runs again.

Through the real openai client against the local model server, with the in-memory journal
(the Redis journal is the same contract); the tool is a small ledger that applies a side
effect once per idempotency key and counts every call it receives."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from agentfabric.errors import ToolError
from agents.engine import Engine, StepRun
from agents.journal import MemoryJournal
from agents.loader import parse_workflow
from agents.model_script import ModelScript
from agents.model_server import ModelServerHandle, serve
from agents.models import ModelClient, ModelRegistry
from agents.recording import output_bytes
from agents.workflow import WorkflowSet
from schemas.models import RunResult, StepMessage, TriggerEvent
from tools.knowledge import KnowledgeBase, read_documents
from tools.registry import ToolCall, ToolRegistry
from tools.vectors import EmbeddedVectorStore, OpenAIEmbedder

pytestmark = pytest.mark.timeout(60)

DOCS = Path(__file__).parents[2] / "tools/data/kb/retrieval_docs.jsonl"
WORKFLOW = {
    "name": "durable", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [{
        "id": "act", "kind": "llm", "model": "local-test",
        "system": "You keep the ledger. Use the tools.",
        "prompt": "Apply {{ input.item }} for {{ input.customer }}.",
        "tools": ["ledger.apply", "ledger.refuse"], "max_iterations": 6,
        "output_schema": {"type": "object", "required": ["seen"]},
    }],
}
LOOKUP_WORKFLOW = {
    "name": "similar", "version": 1,
    "trigger": {"source": "crm", "event_types": ["lead.created"]},
    "steps": [{"id": "find", "kind": "lookup", "collection": "Companies",
               "query": "{{ input.need }}", "k": 3}],
}
FINAL = {"content": {"seen": "{{ tool_results }}"}}  # the answer shows what the tools said
REFUSAL = "the ledger is closed for"


def apply(*items: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "ledger.apply", "arguments": {"item": i}} for i in items]}


def refuse(item: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "ledger.refuse", "arguments": {"item": item}}]}


class Item(BaseModel):
    item: str


class Ledger:
    """A tool with a side effect applied once per idempotency key (like a payment API)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (tool, item, idempotency key)
        self.applied: dict[str, dict[str, Any]] = {}

    def registry(self) -> ToolRegistry:
        tools = ToolRegistry()

        @tools.register("ledger.apply", Item, "Apply an item to the ledger.")
        async def _apply(args: Item, call: ToolCall) -> dict[str, Any]:
            self.calls.append(("ledger.apply", args.item, call.idempotency_key))
            if call.idempotency_key not in self.applied:
                self.applied[call.idempotency_key] = {"applied": args.item,
                                                      "entry": len(self.applied) + 1}
            return self.applied[call.idempotency_key]

        @tools.register("ledger.refuse", Item, "Always refuses.")
        async def _refuse(args: Item, call: ToolCall) -> dict[str, Any]:
            self.calls.append(("ledger.refuse", args.item, call.idempotency_key))
            raise ToolError(f"{REFUSAL} {args.item}; try again tomorrow")

        return tools


@pytest.fixture
async def server() -> AsyncIterator[ModelServerHandle]:
    handle = await serve(ModelScript.parse({"rules": []}), port=0)
    try:
        yield handle
    finally:
        await handle.close()


def rule(turns: list[dict[str, Any]], user_contains: str | None = None) -> dict[str, Any]:
    match: dict[str, Any] = {"workflow": "durable", "step": "act"}
    if user_contains is not None:
        match["user_contains"] = user_contains
    return {"match": match, "turns": turns, "repeat_last": False}


async def use_script(server: ModelServerHandle, turns: list[dict[str, Any]],
                     *more: dict[str, Any]) -> None:
    """The step's turns; ``more`` rules are matched first."""
    script = {"rules": [*more, rule(turns)]}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"http://127.0.0.1:{server.port}/_script",
                                   content=json.dumps(script))
        assert response.status_code == 200, response.text


async def server_log(server: ModelServerHandle) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{server.port}/_requests")
        return list(response.json())


async def clear_log(server: ModelServerHandle) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.delete(f"http://127.0.0.1:{server.port}/_requests")
        assert response.status_code == 200


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def engine(server: ModelServerHandle, ledger: Ledger) -> AsyncIterator[Engine]:
    registry = ModelRegistry.model_validate({
        "providers": {"local": {"base_url": server.url}},
        "models": {"local-test": {"provider": "local", "model": "fabric-local-1"}}})
    models = ModelClient(registry, timeout_s=5, max_retries=0)
    engine = Engine(WorkflowSet([parse_workflow(WORKFLOW, "durable.yaml")]),
                    ledger.registry(), models=models, record_all=True)
    engine.journal = MemoryJournal()
    try:
        yield engine
    finally:
        await models.close()


def journal_of(engine: Engine) -> MemoryJournal:
    assert isinstance(engine.journal, MemoryJournal)
    return engine.journal


def message(engine: Engine, item: str = "invoice-7", customer: str = "contoso") -> StepMessage:
    [msg] = engine.start(TriggerEvent(event_id="e-1", source="crm", event_type="lead.created",
                                      payload={"item": item, "customer": customer}))
    return msg


def result_of(run: StepRun) -> RunResult:
    assert isinstance(run.next, RunResult)
    return run.next


async def test_a_rerun_asks_nothing_again_and_gives_the_same_bytes(
        server: ModelServerHandle, engine: Engine, ledger: Ledger) -> None:
    await use_script(server, [apply("invoice-7"), FINAL])
    msg = message(engine)
    first = await engine.run_step(msg)
    assert len(await server_log(server)) == 2
    assert [(t, i) for t, i, _ in ledger.calls] == [("ledger.apply", "invoice-7")]
    journaled = journal_of(engine).entries[msg.idempotency_key]
    assert [e["kind"] for e in journaled] == ["model", "tool", "model"]
    assert first.output == {"seen": [{"applied": "invoice-7", "entry": 1}]}

    again = await engine.run_step(msg)  # e.g. a redelivery after a crash before the send
    assert len(await server_log(server)) == 2, "the model was asked again"
    assert len(ledger.calls) == 1, "a completed tool call was repeated"
    assert output_bytes(again.output) == output_bytes(first.output)
    assert result_of(again).usage == result_of(first).usage
    assert again.recording is not None
    assert again.recording.interactions == journaled
    assert len(journal_of(engine).entries[msg.idempotency_key]) == 3, "journaled twice"


@pytest.mark.parametrize("kept", [1, 2])
async def test_after_a_crash_only_the_missing_calls_are_made(
        server: ModelServerHandle, engine: Engine, ledger: Ledger, kept: int) -> None:
    """kept=1: the crash came after the first model call; kept=2: after the tool call."""
    await use_script(server, [apply("invoice-7"), FINAL])
    msg = message(engine)
    full = await engine.run_step(msg)
    entries = journal_of(engine).entries[msg.idempotency_key]
    assert [e["kind"] for e in entries] == ["model", "tool", "model"]
    [(_, _, key)] = ledger.calls

    crashed = MemoryJournal()
    crashed.entries[msg.idempotency_key] = copy.deepcopy(entries[:kept])
    engine.journal = crashed
    await clear_log(server)
    ledger.calls.clear()
    rerun = await engine.run_step(msg)

    assert [r["turn"] for r in await server_log(server)] == [1], \
        "the model must be asked only for the answer it had not given"
    if kept == 1:
        assert ledger.calls == [("ledger.apply", "invoice-7", key)], \
            "the tool call in flight runs again, with the same idempotency key"
    else:
        assert ledger.calls == [], "a journaled tool call was repeated"
    assert len(ledger.applied) == 1, "the side effect was applied twice"
    assert output_bytes(rerun.output) == output_bytes(full.output)
    assert crashed.entries[msg.idempotency_key] == entries, \
        "the journal does not hold the completed run"


async def test_a_refused_tool_call_is_journaled_and_never_made_again(
        server: ModelServerHandle, engine: Engine, ledger: Ledger) -> None:
    await use_script(server, [refuse("invoice-7"), FINAL])
    msg = message(engine)
    first = await engine.run_step(msg)
    error = f"error: {REFUSAL} invoice-7; try again tomorrow"
    assert first.output == {"seen": [error]}, "the refusal is fed back to the model"
    assert len(ledger.calls) == 1
    entries = journal_of(engine).entries[msg.idempotency_key]
    assert [e["kind"] for e in entries] == ["model", "tool", "model"]
    assert entries[1]["error"] == f"{REFUSAL} invoice-7; try again tomorrow"
    assert "result" not in entries[1]
    assert first.recording is not None
    assert first.recording.interactions == entries, "the refusal is not in the recording"

    # the whole step again: nothing is asked or called
    again = await engine.run_step(msg)
    assert len(await server_log(server)) == 2
    assert len(ledger.calls) == 1
    assert output_bytes(again.output) == output_bytes(first.output)

    # a crash after the refusal was journaled: the model gets the same error text back
    crashed = MemoryJournal()
    crashed.entries[msg.idempotency_key] = copy.deepcopy(entries[:2])
    engine.journal = crashed
    await clear_log(server)
    rerun = await engine.run_step(msg)
    assert len(ledger.calls) == 1, "the refused call was made again"
    assert [r["turn"] for r in await server_log(server)] == [1]
    assert output_bytes(rerun.output) == output_bytes(first.output)
    assert crashed.entries[msg.idempotency_key][2]["request"] == entries[2]["request"], \
        "the model was not sent the same conversation (the same error text)"


async def test_a_run_with_a_refused_tool_call_replays_to_the_same_bytes(
        server: ModelServerHandle, engine: Engine, ledger: Ledger) -> None:
    await use_script(server, [apply("invoice-7"), refuse("invoice-8"), FINAL])
    engine.journal = None  # a plain recorded run
    msg = message(engine)
    live = await engine.run_step(msg)
    assert live.recording is not None
    assert [e["kind"] for e in live.recording.interactions] == [
        "model", "tool", "model", "tool", "model"]
    assert "error" in live.recording.interactions[3]
    await server.close()  # `runs replay` needs neither the model nor the tool
    calls = len(ledger.calls)

    replayed = await engine.run_step(msg, replay=live.recording.interactions)
    assert len(ledger.calls) == calls
    assert output_bytes(replayed.output) == live.recording.output
    assert output_bytes(replayed.output) == output_bytes(live.output)


async def test_a_journal_of_another_run_is_truncated_and_the_step_runs_live(
        server: ModelServerHandle, engine: Engine, ledger: Ledger,
        caplog: pytest.LogCaptureFixture) -> None:
    await use_script(server, [apply("invoice-7"), FINAL],
                     rule([apply("invoice-9"), FINAL], user_contains="invoice-9"))
    old = message(engine, item="invoice-7")
    await engine.run_step(old)
    await clear_log(server)

    # same journal key, another prompt (say, the workflow changed between the runs)
    new = message(engine, item="invoice-9")
    with caplog.at_level(logging.WARNING, logger="agents.recording"):
        run = await engine.run_step(new, journal_key=old.idempotency_key)
    assert "step 'act' asked for other calls than its journal holds from call 1 on " \
           "(model local-test); running them live" in caplog.text
    assert len(await server_log(server)) == 2
    assert [i for _, i, _ in ledger.calls] == ["invoice-7", "invoice-9"]
    assert run.output == {"seen": [{"applied": "invoice-9", "entry": 2}]}
    entries = journal_of(engine).entries[old.idempotency_key]
    assert [e["kind"] for e in entries] == ["model", "tool", "model"], \
        "the stale entries were not dropped"
    assert entries[1]["arguments"] == {"item": "invoice-9"}


async def test_a_journal_that_stops_fitting_midway_is_cut_there(
        server: ModelServerHandle, engine: Engine, ledger: Ledger,
        caplog: pytest.LogCaptureFixture) -> None:
    await use_script(server, [apply("invoice-7"), FINAL])
    msg = message(engine)
    await engine.run_step(msg)
    entries = journal_of(engine).entries[msg.idempotency_key]
    tampered = MemoryJournal()
    tampered.entries[msg.idempotency_key] = copy.deepcopy(entries)
    tampered.entries[msg.idempotency_key][1]["request"] = "0" * 32
    engine.journal = tampered
    await clear_log(server)

    with caplog.at_level(logging.WARNING, logger="agents.recording"):
        run = await engine.run_step(msg)
    assert "from call 2 on (tool ledger.apply)" in caplog.text
    assert [r["turn"] for r in await server_log(server)] == [1], \
        "the first model call still fits and is answered from the journal"
    assert len(ledger.calls) == 2
    assert len(ledger.applied) == 1, "the same idempotency key both times"
    assert run.output == {"seen": [{"applied": "invoice-7", "entry": 1}]}
    assert tampered.entries[msg.idempotency_key] == entries


async def test_tool_idempotency_keys_do_not_depend_on_the_order_of_calls_in_a_turn(
        server: ModelServerHandle, engine: Engine, ledger: Ledger) -> None:
    msg = message(engine)
    keys = []
    for order in (["a", "b", "a"], ["b", "a", "a"]):
        # a fresh journal: the crash came while the first model call was in flight, and the
        # model lists the same calls in another order this time
        engine.journal = MemoryJournal()
        ledger.calls.clear()
        await use_script(server, [apply(*order), FINAL])
        await engine.run_step(msg)
        assert [i for _, i, _ in ledger.calls] == order
        keys.append({(i, key) for _, i, key in ledger.calls})
    assert keys[0] == keys[1]
    assert len(keys[0]) == 3, "two identical calls in one turn got the same key"
    prefix = f"{msg.idempotency_key}:tool:ledger.apply:"
    assert all(key.startswith(prefix) for _, key in keys[0])
    assert sorted(key.rsplit(":", 1)[1] for i, key in keys[0] if i == "a") == ["1", "2"]
    assert len(ledger.applied) == 3, "a side effect was applied twice"


async def test_a_lookup_is_answered_from_the_journal(server: ModelServerHandle,
                                                     tmp_path: Path) -> None:
    client = openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0)
    kb = KnowledgeBase(EmbeddedVectorStore(tmp_path / "vectors"),
                       OpenAIEmbedder(client, "fabric-local-1", 384))
    try:
        await kb.ingest("Companies", "acme", read_documents([DOCS]))
        engine = Engine(WorkflowSet([parse_workflow(LOOKUP_WORKFLOW, "similar.yaml")]),
                        ToolRegistry(), knowledge=kb)
        engine.journal = journal = MemoryJournal()
        [msg] = engine.start(TriggerEvent(event_id="e-2", source="crm",
                                          event_type="lead.created", tenant="acme",
                                          payload={"need": "refrigerated trucks"}))
        await clear_log(server)
        first = await engine.run_step(msg)
        assert len(await server_log(server)) == 1, "one embedding of the query"
        assert first.output["hits"], "the lookup found nothing"
        [entry] = journal.entries[msg.idempotency_key]
        assert (entry["kind"], entry["name"]) == ("lookup", "Companies")

        again = await engine.run_step(msg)
        assert len(await server_log(server)) == 1, "the lookup was made again"
        assert output_bytes(again.output) == output_bytes(first.output)
    finally:
        await kb.close()
        await client.close()
