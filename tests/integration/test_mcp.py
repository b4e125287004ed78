"""`agentfabric mcp` as an MCP client meets it: the sample workflows are tools with object
input schemas, a call runs the workflow through Kafka (a worker in this process) and returns
its output, and the run is a resource. Over stdio and over streamable HTTP; every server
process is stopped by its pid."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from mcp.types import TextContent, TextResourceContents
from pydantic import AnyUrl

from agentfabric.settings import Settings
from streams.embedded import free_port, pid_alive

from .helpers import invoice_case, running_worker
from .test_cli import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# execs the server in the same process, after writing its pid where the test can read it
LAUNCH = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); "
          "os.execv(sys.executable, [sys.executable, '-m', 'agentfabric', *sys.argv[2:]])")


def server_env(settings: Settings) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTFABRIC_")}
    return {**clean, **settings_env(settings)}


def stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) != (0, 0):
                    return
            time.sleep(0.05)


@contextlib.asynccontextmanager
async def stdio_session(settings: Settings, tmp_path: Path, timeout_s: float = 60,
                        ) -> AsyncIterator[ClientSession]:
    pid_file = tmp_path / "mcp.pid"
    params = StdioServerParameters(
        command=sys.executable, env=server_env(settings),
        args=["-c", LAUNCH, str(pid_file), "mcp", "--tenant", "acme", "--timeout",
              str(timeout_s)])
    with (tmp_path / "mcp.log").open("w") as errlog:
        try:
            async with stdio_client(params, errlog=errlog) as (read, write), \
                    ClientSession(read, write) as session:
                await session.initialize()
                yield session
        finally:
            if pid_file.exists():
                pid = int(pid_file.read_text())
                stop_pid(pid)
                assert not pid_alive(pid)


@contextlib.contextmanager
def http_server(settings: Settings, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with (tmp_path / "mcp-http.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentfabric", "mcp", "--http", "--port", str(port),
             "--tenant", "acme", "--timeout", "60"],
            env=server_env(settings), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:  # readiness: the port accepts connections
                assert proc.poll() is None, (tmp_path / "mcp-http.log").read_text()
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                assert time.monotonic() < deadline, "the MCP HTTP server did not listen"
                time.sleep(0.1)
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            stop_pid(proc.pid)
            proc.wait(timeout=5)
            assert not pid_alive(proc.pid)


def invoice() -> tuple[dict[str, Any], dict[str, Any]]:
    case = invoice_case(1, random.Random(3))
    return case.event.payload, case.expected


async def check_session(session: ClientSession) -> None:
    tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert {"invoice_triage", "lead_enrichment"} <= set(tools)
    for name in ("invoice_triage", "lead_enrichment"):
        schema = tools[name].inputSchema
        assert schema["type"] == "object"
        assert "tenant" in schema["properties"]
    assert "vendor_id" in tools["invoice_triage"].inputSchema["required"]
    assert tools["lead_enrichment"].description

    payload, expected = invoice()
    result = await session.call_tool("invoice_triage", payload)
    assert not result.isError, result.content
    assert isinstance(result.content[0], TextContent)
    output = json.loads(result.content[0].text)
    assert result.structuredContent == output
    for key, value in expected.items():
        assert output[key] == value

    resources = (await session.list_resources()).resources
    assert len(resources) == 1
    uri = resources[0].uri
    templates = (await session.list_resource_templates()).resourceTemplates
    assert [t.uriTemplate for t in templates] == ["run://{run_id}"]
    contents = (await session.read_resource(uri)).contents
    assert isinstance(contents[0], TextResourceContents)
    run = json.loads(contents[0].text)
    assert run["status"] == "completed"
    assert run["workflow"] == "invoice_triage"
    assert run["tenant"] == "acme"
    assert run["output"] == output
    assert str(uri) == f"run://{run['run_id']}"


async def test_stdio_lists_workflows_runs_one_and_reads_its_status(
        settings: Settings, tmp_path: Path) -> None:
    async with running_worker(settings), stdio_session(settings, tmp_path) as session:
        await check_session(session)
        # an input the workflow's schema refuses never starts a run
        refused = await session.call_tool("invoice_triage", {"invoice_id": "INV-x"})
        assert refused.isError
        assert "vendor_id" in str(refused.content[0])


async def test_streamable_http_runs_a_workflow(settings: Settings, tmp_path: Path) -> None:
    async with running_worker(settings):
        with http_server(settings, tmp_path) as url:
            async with streamable_http_client(url) as (read, write, _), \
                    ClientSession(read, write) as session:
                await session.initialize()
                await check_session(session)


async def test_a_run_of_another_client_is_read_from_the_result_topic(
        settings: Settings, tmp_path: Path) -> None:
    """A run this server did not start is found on the result topics; an unknown one is an
    error that says so."""
    from .helpers import collect_results, publish_cases

    case = invoice_case(2, random.Random(5))
    async with running_worker(settings):
        await publish_cases(settings, [case])
        await collect_results(settings, "invoice_triage", 1)
        async with stdio_session(settings, tmp_path) as session:
            contents = (await session.read_resource(AnyUrl(f"run://{case.run_id}"))).contents
            assert isinstance(contents[0], TextResourceContents)
            run = json.loads(contents[0].text)
            assert run["status"] == "completed"
            assert run["output"]["invoice_id"] == case.expected["invoice_id"]
            with pytest.raises(McpError, match="no run"):
                await session.read_resource(AnyUrl("run://00000000-0000-0000-0000-000000000000"))


async def read_run(session: ClientSession, uri: AnyUrl | str) -> dict[str, Any]:
    contents = (await session.read_resource(AnyUrl(str(uri)))).contents
    assert isinstance(contents[0], TextResourceContents)
    run: dict[str, Any] = json.loads(contents[0].text)
    return run


async def test_a_call_that_times_out_names_the_run_which_finishes_later(
        settings: Settings, tmp_path: Path) -> None:
    """No worker yet: the call is an error naming the run, whose resource says running;
    once a worker runs, the same resource says completed."""
    from agentfabric.app import build_engine, provision

    await provision(settings, build_engine(settings))
    payload, expected = invoice()
    async with stdio_session(settings, tmp_path, timeout_s=1) as session:
        result = await session.call_tool("invoice_triage", payload)
        assert result.isError
        text = str(result.content[0])
        assert "did not finish within 1s" in text
        uri = (await session.list_resources()).resources[0].uri
        assert str(uri) in text
        assert (await read_run(session, uri))["status"] == "running"
        async with running_worker(settings):
            deadline = time.monotonic() + 60
            while (run := await read_run(session, uri))["status"] == "running":
                assert time.monotonic() < deadline, run
        assert run["status"] == "completed"
        assert run["output"]["queue"] == expected["queue"]
