"""``agentfabric mcp``: the loaded workflows as MCP tools, over stdio or streamable HTTP.

- one tool per workflow (its latest version): name = the workflow's name, description = its
  description, input schema = its ``input_schema`` (else one derived from the ``input.*``
  fields it reads, see ``agents.inputs``) plus an optional ``tenant``;
- calling a tool runs the workflow through Kafka and waits for its ``RunResult``
  (``Client.run``: request-reply on the result topic): the run's output comes back as JSON
  text (and as structured content when it is an object); a run that ends in another status
  than ``completed``, or does not finish within the timeout, is an error result naming it;
- ``run://{run_id}`` is a resource template: the run's latest known status and result (the
  runs this server started are listed as resources).

Built on the official SDK's low-level server (tools are data here, not Python functions).
Nothing happens on import.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import mcp.types as types
from mcp.server.lowlevel import Server
from mcp.server.lowlevel.helper_types import ReadResourceContents
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agents.inputs import input_schema
from agents.workflow import Workflow, WorkflowSet
from schemas.models import NAME_PATTERN

from .client import Client
from .errors import AgentFabricError
from .mcp_runs import RunRecord, RunTracker
from .settings import Settings

__all__ = ["RUN_URI_TEMPLATE", "build_server", "serve_http", "serve_stdio", "tool_schema"]

RUN_URI_TEMPLATE = "run://{run_id}"
RUN_SCHEME = "run://"
TENANT = "tenant"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def tool_schema(wf: Workflow, default_tenant: str) -> dict[str, Any]:
    """The tool's input schema: the workflow's input schema, plus an optional ``tenant``
    unless the input itself has a field of that name."""
    schema = dict(input_schema(wf))
    properties = dict(schema.get("properties", {}))
    if TENANT not in properties:
        properties[TENANT] = {
            "type": "string", "pattern": NAME_PATTERN, "default": default_tenant,
            "description": f"The tenant the run belongs to (not part of the workflow's "
                           f"input); default {default_tenant}."}
    schema["properties"] = properties
    schema.setdefault("type", "object")
    return schema


def _tool(wf: Workflow, default_tenant: str) -> types.Tool:
    return types.Tool(
        name=wf.name, title=wf.name.replace("_", " "),
        description=(wf.description or f"Run the workflow {wf.name}.")
        + f" (workflow {wf.name} v{wf.version}; the result is the run's output as JSON)",
        inputSchema=tool_schema(wf, default_tenant),
        annotations=types.ToolAnnotations(readOnlyHint=False, openWorldHint=True))


def _text(value: Any) -> types.TextContent:
    return types.TextContent(type="text", text=json.dumps(value, ensure_ascii=False, indent=2))


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                isError=True)


class FabricTools:
    """The MCP handlers: workflows as tools, runs as resources."""

    def __init__(self, workflows: WorkflowSet, tracker: RunTracker, *, tenant: str,
                 timeout_s: float) -> None:
        self.workflows = workflows
        self.tracker = tracker
        self.tenant = tenant
        self.timeout_s = timeout_s

    async def list_tools(self) -> list[types.Tool]:
        return [_tool(self.workflows.latest(name), self.tenant)
                for name in self.workflows.names()]

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        try:
            wf = self.workflows.latest(name)
        except AgentFabricError as exc:
            return _error(str(exc))
        payload = dict(arguments)
        declared = TENANT in input_schema(wf).get("properties", {})
        tenant = self.tenant if declared else str(payload.pop(TENANT, self.tenant))
        try:
            record = await self.tracker.run(name, payload, tenant, self.timeout_s)
        except AgentFabricError as exc:
            return _error(f"the run of {name} failed to start or to report: {exc}")
        result = record.result
        uri = RUN_SCHEME + record.run_id
        if result is None:
            return _error(f"run {record.run_id} of {name} did not finish within "
                          f"{self.timeout_s:g}s; it goes on: read the resource {uri} for "
                          f"its status later")
        if result.status != "completed":
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=(
                    f"run {record.run_id} of {name} ended as {result.status} (resource "
                    f"{uri})")), _text(result.output)], isError=True)
        structured = result.output if isinstance(result.output, dict) else None
        return types.CallToolResult(content=[_text(result.output)],
                                    structuredContent=structured, isError=False)

    async def list_resources(self) -> list[types.Resource]:
        recent = list(self.tracker.runs.values())[-100:]
        return [_run_resource(record) for record in reversed(recent)]

    async def list_resource_templates(self) -> list[types.ResourceTemplate]:
        return [types.ResourceTemplate(
            uriTemplate=RUN_URI_TEMPLATE, name="run", title="Workflow run",
            description="A run's latest known status (running, completed, rejected, ...) "
                        "and, once it finished, its output and usage.",
            mimeType="application/json")]

    async def read_resource(self, uri: AnyUrl) -> Iterable[ReadResourceContents]:
        text = str(uri)
        if not text.startswith(RUN_SCHEME):
            raise McpError(types.ErrorData(code=types.INVALID_PARAMS,
                                           message=f"unknown resource {text}; runs are "
                                                   f"{RUN_URI_TEMPLATE}"))
        run_id = text[len(RUN_SCHEME):].strip("/")
        view = await self.tracker.lookup(run_id)
        if view is None:
            raise McpError(types.ErrorData(
                code=-32002, message=f"no run {run_id} is known: this server did not start "
                                     f"it and no result topic has it (yet)"))
        return [ReadResourceContents(content=json.dumps(view, ensure_ascii=False, indent=2),
                                     mime_type="application/json")]


def _run_resource(record: RunRecord) -> types.Resource:
    return types.Resource(uri=AnyUrl(RUN_SCHEME + record.run_id),
                          name=f"{record.workflow} run {record.run_id}",
                          description=f"{record.workflow} run for {record.tenant}: {record.status}",
                          mimeType="application/json")


def build_server(handlers: FabricTools) -> Server[Any, Any]:
    """The low-level MCP server with ``handlers`` registered."""
    server: Server[Any, Any] = Server(
        "agentfabric", instructions="Each tool runs one agentfabric workflow through Kafka "
        "and returns the run's output; run://{run_id} resources hold each run's status.")
    # the SDK's registration decorators are not annotated
    server.list_tools()(handlers.list_tools)  # type: ignore[no-untyped-call]
    server.call_tool()(handlers.call_tool)
    server.list_resources()(handlers.list_resources)  # type: ignore[no-untyped-call]
    server.list_resource_templates()(  # type: ignore[no-untyped-call]
        handlers.list_resource_templates)
    server.read_resource()(handlers.read_resource)  # type: ignore[no-untyped-call]
    return server


@asynccontextmanager
async def _fabric(settings: Settings, tenant: str, timeout_s: float,
                  ) -> AsyncIterator[FabricTools]:
    async with Client(settings) as client:
        workflows = client.workflows
        tracker = RunTracker(settings, client, workflows)
        yield FabricTools(workflows, tracker, tenant=tenant, timeout_s=timeout_s)


async def serve_stdio(settings: Settings, *, tenant: str = "default",
                      timeout_s: float = 120.0) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin."""
    from mcp.server.stdio import stdio_server

    async with _fabric(settings, tenant, timeout_s) as handlers:
        server = build_server(handlers)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


async def serve_http(settings: Settings, *, host: str = "127.0.0.1", port: int = 8765,
                     tenant: str = "default", timeout_s: float = 120.0) -> None:
    """Serve MCP over streamable HTTP at ``http://host:port/mcp`` until SIGTERM/SIGINT."""
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    async with _fabric(settings, tenant, timeout_s) as handlers:
        security = None
        if host in LOOPBACK:  # refuse DNS-rebinding requests, as the SDK's FastMCP does
            security = TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
                allowed_origins=["http://127.0.0.1:*", "http://localhost:*",
                                 "http://[::1]:*"])
        manager = StreamableHTTPSessionManager(app=build_server(handlers),
                                               security_settings=security)

        @asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            async with manager.run():
                yield

        app = Starlette(routes=[Route("/mcp", endpoint=_Endpoint(manager))], lifespan=lifespan)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                lifespan="on")
        await uvicorn.Server(config).serve()


class _Endpoint:
    """The MCP endpoint as a plain ASGI app (Starlette routes a class instance as one)."""

    def __init__(self, manager: StreamableHTTPSessionManager) -> None:
        self.manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.manager.handle_request(scope, receive, send)
