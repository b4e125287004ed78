"""The local OpenAI-compatible model server, driven through the real ``openai`` client."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from agentfabric.errors import ConfigError, PortInUseError
from agents.model_server import ModelScript, ModelServerHandle, count_tokens, serve

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
default_model: fabric-local-1
rules:
  - name: content
    match: {workflow: wf, step: content}
    turns:
      - content: "hello {{ user }}"
  - name: tools
    match: {workflow: wf, step: tools}
    turns:
      - tool_calls:
          - {name: accounts.lookup, arguments: {domain: "{{ user_json.domain }}"}}
      - tool_calls:
          - {name: accounts.lookup, arguments: {domain: other.com}}
          - {name: crm.note, arguments: {text: "turn {{ turn }}"}}
      - tool_calls:
          - {name: crm.score, arguments: {results: "{{ len(tool_results) }}"}}
      - content: '{"fit": "high", "score": {{ tool_results[-1].employees }}}'
  - name: once
    match: {workflow: wf, step: once}
    repeat_last: false
    turns:
      - content: first
  - name: faults
    match: {workflow: wf, step: faults}
    faults:
      - {status: 429, retry_after: 1, times: 1}
      - {status: 500, times: 1}
      - {delay_ms: 300, times: 1}
    turns:
      - content: recovered
  - name: retry
    match: {workflow: wf, step: retry}
    faults:
      - {status: 429, retry_after: 1}
    turns:
      - content: after the wait
  - name: by-model
    match: {model: special-model, user_contains: Contoso}
    turns:
      - content: "{{ headers.run }} {{ model }} {{ user_json }}"
"""

DEMO = Path(__file__).resolve().parents[2] / "agents" / "model_scripts" / "demo.yaml"


def headers(step: str, workflow: str = "wf", **more: str) -> dict[str, str]:
    return {"x-agentfabric-workflow": workflow, "x-agentfabric-step": step,
            **{f"x-agentfabric-{k}": v for k, v in more.items()}}


def expected_prompt_tokens(messages: list[dict[str, Any]], tools: Any = None) -> int:
    """The documented rule: content, tool calls' name + arguments, tools JSON, 3 per message."""
    total = 3 * len(messages)
    for message in messages:
        total += count_tokens(message.get("content") or "")
        for call in message.get("tool_calls") or []:
            total += count_tokens(call["function"]["name"])
            total += count_tokens(call["function"]["arguments"])
    return total + (count_tokens(json.dumps(tools)) if tools else 0)


@pytest.fixture
async def server() -> AsyncIterator[ModelServerHandle]:
    handle = await serve(ModelScript.loads(SCRIPT, "test-script.yaml"), port=0)
    try:
        yield handle
    finally:
        await handle.close()


@pytest.fixture
async def client(server: ModelServerHandle) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=0) as c:
        yield c


@pytest.fixture
async def http(server: ModelServerHandle) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=server.url.removesuffix("v1")) as session:
        yield session


async def request_log(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with http.get("_requests") as response:
        assert response.status == 200
        log: list[dict[str, Any]] = await response.json()
        return log


def test_count_tokens() -> None:
    assert count_tokens("") == 0
    assert count_tokens("  hello   world ") == 2
    assert count_tokens('{"a": 12}') == 7  # { " a " : 12 }
    assert count_tokens("don't stop") == 4


async def test_content_answer_with_usage(client: openai.AsyncOpenAI) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Alice, from Contoso!"},
    ]
    result = await client.chat.completions.create(
        model="fabric-local-1", messages=messages,  # type: ignore[arg-type]
        extra_headers=headers("content"))
    choice = result.choices[0]
    assert choice.message.content == "hello Alice, from Contoso!"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert result.model == "fabric-local-1"
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.usage is not None
    prompt = count_tokens("You are terse.") + count_tokens("Alice, from Contoso!") + 2 * 3
    assert result.usage.prompt_tokens == prompt == expected_prompt_tokens(messages)
    assert result.usage.completion_tokens == count_tokens("hello Alice, from Contoso!") == 6
    assert result.usage.total_tokens == prompt + 6


async def test_tool_call_turn(client: openai.AsyncOpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "accounts.lookup", "description": "Look an account up.",
        "parameters": {"type": "object", "properties": {"domain": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": json.dumps({"domain": "contoso.com"})}]
    result = await client.chat.completions.create(
        model="fabric-local-1", messages=messages, tools=tools,  # type: ignore[arg-type]
        extra_headers=headers("tools"))
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.id == "call_0_0"
    assert call.type == "function"
    assert call.function.name == "accounts.lookup"
    assert json.loads(call.function.arguments) == {"domain": "contoso.com"}
    assert result.usage is not None
    assert result.usage.prompt_tokens == expected_prompt_tokens(messages, tools)
    assert result.usage.completion_tokens == (
        count_tokens("accounts.lookup") + count_tokens(call.function.arguments))


async def test_turns_advance_with_assistant_and_tool_messages(
        client: openai.AsyncOpenAI) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": json.dumps({"domain": "contoso.com"})}]
    seen: list[list[tuple[str, str, dict[str, Any]]]] = []
    for _ in range(3):
        result = await client.chat.completions.create(
            model="fabric-local-1", messages=messages,  # type: ignore[arg-type]
            extra_headers=headers("tools"))
        message = result.choices[0].message
        assert message.tool_calls is not None
        seen.append([(c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
                     for c in message.tool_calls])
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps({"employees": 100 + len(messages)})})
    assert seen == [
        [("call_0_0", "accounts.lookup", {"domain": "contoso.com"})],
        [("call_1_0", "accounts.lookup", {"domain": "other.com"}),
         ("call_1_1", "crm.note", {"text": "turn 1"})],
        [("call_2_0", "crm.score", {"results": 3})],
    ]
    result = await client.chat.completions.create(
        model="fabric-local-1", messages=messages,  # type: ignore[arg-type]
        extra_headers=headers("tools"))
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    last_employees = json.loads(messages[-1]["content"])["employees"]
    assert json.loads(choice.message.content or "") == {"fit": "high", "score": last_employees}
    assert result.usage is not None
    assert result.usage.prompt_tokens == expected_prompt_tokens(messages)


async def test_repeat_last_and_exhausted(client: openai.AsyncOpenAI) -> None:
    history: list[dict[str, Any]] = []
    for i in range(4):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
    history.append({"role": "user", "content": "again"})
    result = await client.chat.completions.create(
        model="fabric-local-1", messages=history,  # type: ignore[arg-type]
        extra_headers=headers("content"))
    assert result.choices[0].message.content == "hello again"

    first = await client.chat.completions.create(
        model="fabric-local-1", messages=[{"role": "user", "content": "hi"}],
        extra_headers=headers("once"))
    assert first.choices[0].message.content == "first"
    with pytest.raises(openai.BadRequestError, match="script exhausted") as exc:
        await client.chat.completions.create(
            model="fabric-local-1", messages=history,  # type: ignore[arg-type]
            extra_headers=headers("once"))
    assert exc.value.code == "script_exhausted"


async def test_faults_in_order_then_reset(
        client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="fabric-local-1", messages=messages, extra_headers=headers("faults"))
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.status_code == 429
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="fabric-local-1", messages=messages, extra_headers=headers("faults"))

    started = time.monotonic()
    slow = await client.chat.completions.create(
        model="fabric-local-1", messages=messages, extra_headers=headers("faults"))
    assert time.monotonic() - started >= 0.3
    assert slow.choices[0].message.content == "recovered"

    started = time.monotonic()
    fast = await client.chat.completions.create(
        model="fabric-local-1", messages=messages, extra_headers=headers("faults"))
    assert time.monotonic() - started < 0.3
    assert fast.choices[0].message.content == "recovered"

    log = await request_log(http)
    assert [(e["status"], e["fault"]) for e in log] == [
        (429, "status 429"), (500, "status 500"), (200, "delay 300 ms"), (200, None)]

    async with http.post("_script/reset") as response:
        assert response.status == 200
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="fabric-local-1", messages=messages, extra_headers=headers("faults"))


async def test_client_honours_retry_after(
        server: ModelServerHandle, http: aiohttp.ClientSession) -> None:
    async with openai.AsyncOpenAI(base_url=server.url, api_key="test", max_retries=1) as c:
        result = await c.chat.completions.create(
            model="fabric-local-1", messages=[{"role": "user", "content": "hi"}],
            extra_headers=headers("retry"))
    assert result.choices[0].message.content == "after the wait"
    log = await request_log(http)
    assert [(e["rule"], e["status"]) for e in log] == [("retry", 429), ("retry", 200)]
    assert 0.9 <= log[1]["received_at"] - log[0]["received_at"] < 5


async def test_no_matching_rule(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(
            model="fabric-local-1", messages=[{"role": "user", "content": "hi"}],
            extra_headers=headers("x", workflow="nope"))
    assert "no script rule matches workflow=nope, step=x, model=fabric-local-1" in str(exc.value)
    assert isinstance(exc.value.body, dict)
    assert exc.value.body["type"] == "invalid_request_error"


async def test_match_on_model_and_user_text_with_header_scope(
        client: openai.AsyncOpenAI) -> None:
    result = await client.chat.completions.create(
        model="special-model",
        messages=[{"role": "user", "content": "about Contoso"},
                  {"role": "user", "content": '{"k": 1}'}],
        extra_headers={"x-agentfabric-run": "run-7"})
    assert result.choices[0].message.content == 'run-7 special-model {"k":1}'
    assert result.model == "special-model"
    with pytest.raises(openai.BadRequestError, match="no script rule matches"):
        await client.chat.completions.create(
            model="special-model", messages=[{"role": "user", "content": "about Fabrikam"}])


async def test_stream_is_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        await client.chat.completions.create(
            model="fabric-local-1", messages=[{"role": "user", "content": "hi"}],
            stream=True, extra_headers=headers("content"))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    texts = ["The quick brown fox jumps over the lazy dog",
             "the quick brown fox leaps over a lazy dog",
             "Quarterly revenue report for the finance team", ""]
    result = await client.embeddings.create(model="fabric-embed", input=texts)
    assert result.model == "fabric-embed"
    assert [d.index for d in result.data] == [0, 1, 2, 3]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.sqrt(cosine(v, v)), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[3] == [1.0] + [0.0] * 383
    assert cosine(vectors[0], vectors[1]) > 0.5 > cosine(vectors[0], vectors[2])
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(
        count_tokens(t) for t in texts)

    # deterministic, and the same through the float wire format (base64 carries float32)
    again = await client.embeddings.create(model="fabric-embed", input=texts[0],
                                           encoding_format="float")
    assert len(again.data) == 1
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert (await client.embeddings.create(model="m", input=texts[0])).data[0].embedding \
        == vectors[0]
    small = await client.embeddings.create(model="m", input="hello", dimensions=16)
    assert len(small.data[0].embedding) == 16


async def test_embedding_dim_from_script() -> None:
    handle = await serve(ModelScript.parse({"embedding_dim": 8}), port=0)
    try:
        async with openai.AsyncOpenAI(base_url=handle.url, api_key="t", max_retries=0) as c:
            result = await c.embeddings.create(model="m", input=["a b", "c"])
        assert [len(d.embedding) for d in result.data] == [8, 8]
    finally:
        await handle.close()


async def test_models_and_health(client: openai.AsyncOpenAI,
                                 http: aiohttp.ClientSession) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fabric-local-1", "special-model"]
    async with http.get("healthz") as response:
        assert response.status == 200
        assert await response.text() == "ok"
    async with http.get("v1/nothing") as response:
        assert response.status == 404
        assert "message" in (await response.json())["error"]


def test_invalid_scripts_name_file_and_field(tmp_path: Path) -> None:
    bad_template = {"rules": [{"name": "r", "turns": [{"content": "{{ 1 + }}"}]}]}
    with pytest.raises(ConfigError, match=r"rules\[0\]\.turns\[0\]\.content") as exc:
        ModelScript.parse(bad_template, "inline.yaml")
    assert "inline.yaml" in str(exc.value)
    assert getattr(exc.value, "field", None) == "rules[0].turns[0].content"

    bad_args = {"rules": [{"turns": [{"tool_calls": [{"name": "t", "arguments": {"a": "{{ ("}}]}]}]}
    with pytest.raises(ConfigError, match=r"rules\[0\]\.turns\[0\]\.tool_calls\[0\]\.arguments"):
        ModelScript.parse(bad_args)

    path = tmp_path / "script.yaml"
    path.write_text("rules:\n  - turns: [{content: hi}]\n    latency: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"script\.yaml: field 'rules\[0\]\.latency'"):
        ModelScript.load(path)
    path.write_text("rules:\n  - faults: [{times: 2}]\n    turns: [{content: hi}]\n")
    with pytest.raises(ConfigError, match=r"rules\[0\]\.faults\[0\].*status or a delay_ms"):
        ModelScript.load(path)
    path.write_text("rules: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ModelScript.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        ModelScript.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"field 'rules\[0\]\.turns'"):
        ModelScript.parse({"rules": [{"turns": []}]})


async def test_request_log(client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    before = time.monotonic()
    ok = await client.chat.completions.create(
        model="fabric-local-1", messages=[{"role": "user", "content": "hi there"}],
        extra_headers=headers("content"))
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="other", messages=[{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"},
                                     {"role": "user", "content": "?"}],
            extra_headers=headers("none"))
    log = await request_log(http)
    assert ok.usage is not None
    first, second = log
    assert {k: first[k] for k in ("rule", "workflow", "step", "model", "status", "turn",
                                  "prompt_tokens", "completion_tokens")} == {
        "rule": "content", "workflow": "wf", "step": "content", "model": "fabric-local-1",
        "status": 200, "turn": 0, "prompt_tokens": ok.usage.prompt_tokens,
        "completion_tokens": ok.usage.completion_tokens}
    assert second["rule"] is None
    assert second["status"] == 400
    assert second["turn"] == 1
    assert second["model"] == "other"
    assert before <= first["received_at"] <= second["received_at"] <= time.monotonic()
    async with http.delete("_requests") as response:
        assert response.status == 200
    assert await request_log(http) == []


async def test_replace_script_at_runtime(client: openai.AsyncOpenAI,
                                         http: aiohttp.ClientSession) -> None:
    new = {"default_model": "m2", "rules": [{"name": "new", "turns": [{"content": "replaced"}]}]}
    async with http.post("_script", data=json.dumps(new)) as response:
        assert response.status == 200
    result = await client.chat.completions.create(
        model="m2", messages=[{"role": "user", "content": "hi"}],
        extra_headers=headers("anything"))
    assert result.choices[0].message.content == "replaced"
    assert [m.id for m in (await client.models.list()).data] == ["m2"]

    async with http.post("_script", data="rules:\n  - turns: [{content: '{{ 1 + }}'}]\n") as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert "rules[0].turns[0].content" in error["message"]
    assert error["code"] == "invalid_script"
    again = await client.chat.completions.create(
        model="m2", messages=[{"role": "user", "content": "hi"}])
    assert again.choices[0].message.content == "replaced"  # the old script stays


async def test_port_in_use(server: ModelServerHandle) -> None:
    with pytest.raises(PortInUseError, match=str(server.port)):
        await serve(ModelScript(), port=server.port)


async def test_port_zero_picks_a_free_port(server: ModelServerHandle) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/v1"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass


async def test_demo_script(tmp_path: Path) -> None:
    handle = await serve(ModelScript.load(DEMO), port=0)
    try:
        async with openai.AsyncOpenAI(base_url=handle.url, api_key="t", max_retries=0) as c:
            messages: list[Any] = [
                {"role": "user", "content": json.dumps({"domain": "contoso.com"})}]
            first = await c.chat.completions.create(
                model="fabric-local-1", messages=messages,
                extra_headers=headers("fit", workflow="lead_enrichment"))
            calls = first.choices[0].message.tool_calls
            assert calls is not None
            assert calls[0].function.name == "crm.get_account"  # type: ignore[union-attr]
            assert json.loads(calls[0].function.arguments) == {  # type: ignore[union-attr]
                "domain": "contoso.com"}
            messages.append(first.choices[0].message.model_dump(exclude_none=True))
            messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": json.dumps(
                {"found": True, "domain": "contoso.com", "name": "Contoso Ltd",
                 "employees": 18500})})
            second = await c.chat.completions.create(
                model="fabric-local-1", messages=messages,
                extra_headers=headers("fit", workflow="lead_enrichment"))
            verdict = json.loads(second.choices[0].message.content or "")
            assert verdict == {"fit": "high", "reason": "Contoso Ltd has 18500 employees"}
            other = await c.chat.completions.create(
                model="fabric-local-1", messages=[{"role": "user", "content": "hi"}],
                extra_headers=headers("anything"))
            assert other.choices[0].message.content == "ok"
    finally:
        await handle.close()


async def test_metrics_count_requests_latency_and_tokens(
        client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    result = await client.chat.completions.create(
        model="fabric-local-1", messages=[{"role": "user", "content": "Alice"}],
        extra_headers=headers("content"))
    assert result.usage is not None
    await client.embeddings.create(model="fabric-local-1", input=["one two three"])
    async with http.get("v1/nothing") as response:
        assert response.status == 404
    async with http.get("metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    chat = (("endpoint", "/v1/chat/completions"), ("model", "fabric-local-1"),
            ("status", "200"))
    assert samples[("agentfabric_model_server_requests_total", chat)] == 1
    assert samples[("agentfabric_model_server_requests_total",
                    (("endpoint", "unmatched"), ("model", "-"), ("status", "404")))] == 1
    assert samples[("agentfabric_model_server_request_seconds_count",
                    (("endpoint", "/v1/embeddings"),))] == 1
    tokens_in = samples[("agentfabric_model_server_tokens_total",
                         (("direction", "in"), ("model", "fabric-local-1")))]
    assert tokens_in == result.usage.prompt_tokens + count_tokens("one two three")
    assert samples[("agentfabric_model_server_tokens_total",
                    (("direction", "out"), ("model", "fabric-local-1")))] == \
        result.usage.completion_tokens
