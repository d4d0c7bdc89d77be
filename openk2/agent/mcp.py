"""MCP, both ways, with the official `mcp` SDK (v2).

`MCPTools`: connect to MCP servers — a command line (stdio) or an `http(s)://…/mcp` URL (streamable
HTTP) — and expose their tools to the agent loop as `Tool`s (an error result becomes a `ToolError`).
The connections are entered and left together in one `async with`, because the SDK's task groups
must be closed by the task that opened them. `serve_mcp`: the built-in tools (files, sandboxed code)
as an MCP server (`openk2 mcp-server`), over stdio by default, so any MCP host can launch it.
"""

from __future__ import annotations

import contextlib
import os
import shlex

from openk2.agent.tools import ArgumentError, Tool, ToolError, toolbox


def result_text(result) -> str:
    """The text of a `CallToolResult`: text parts joined, other parts named, structured content as JSON."""
    import json

    parts = []
    for c in result.content or []:
        parts.append(c.text if getattr(c, "type", None) == "text" else f"[{getattr(c, 'type', 'content')} omitted]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def first_leaf(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def mcp_tool(client, spec, name: str) -> Tool:
    """An MCP server's tool as a loop `Tool` (called under `name`, which may differ on a clash)."""
    async def call(arguments: dict, context):
        result = await client.call_tool(spec.name, arguments)
        text = result_text(result)
        if result.is_error:
            raise ToolError(text or f"{spec.name} reported an error")
        return text

    schema = spec.input_schema or {"type": "object", "properties": {}}
    read_only = bool(spec.annotations and spec.annotations.read_only_hint)  # the server's own word for it
    return Tool(name, spec.description or "", schema, call, needs_approval=not read_only)


class MCPTools:
    """`async with MCPTools(["npx server", "http://host/mcp"]) as tools:` — a list of `Tool`s.
    A tool whose name another server (or `taken`) already uses is renamed `{server}_{tool}`."""

    def __init__(self, servers: list[str], taken: set[str] = frozenset(), cwd: str | None = None):
        self.servers, self.taken, self.cwd = list(servers), set(taken), cwd
        self.stack, self.tools = contextlib.AsyncExitStack(), []

    async def __aenter__(self) -> list[Tool]:
        from mcp import Client, StdioServerParameters

        await self.stack.__aenter__()
        try:
            for spec in self.servers:
                if spec.startswith(("http://", "https://")):
                    target = spec
                else:  # a command: the server gets our environment, as a program started from the shell would
                    argv = shlex.split(spec)
                    if not argv:
                        raise ValueError("an empty MCP server command")
                    target = StdioServerParameters(command=argv[0], args=argv[1:], env=dict(os.environ), cwd=self.cwd)
                try:
                    client = await self.stack.enter_async_context(Client(target))
                    await self._add(client, client.server_info.name if client.server_info else spec)
                except Exception as e:  # noqa: BLE001 — the SDK nests the cause in exception groups
                    raise RuntimeError(f"MCP server {spec!r}: {first_leaf(e)}") from e
        except BaseException:
            await self.stack.__aexit__(None, None, None)
            raise
        return self.tools

    async def _add(self, client, server: str) -> None:
        cursor = None
        while True:
            page = await client.list_tools(cursor=cursor)
            for spec in page.tools:
                name = spec.name if spec.name not in self.taken else f"{server}_{spec.name}"
                self.taken.add(name)
                self.tools.append(mcp_tool(client, spec, name))
            if not (cursor := page.next_cursor):
                return

    async def __aexit__(self, *exc):
        return await self.stack.__aexit__(*exc)


def mcp_server(tools: list[Tool], name: str = "openk2"):
    """A low-level MCP `Server` offering `tools`; arguments are checked against each schema, and any
    failure is an error result (the host's model reads it), never a protocol error."""
    import mcp_types as types
    from mcp.server import Server

    by_name = toolbox(tools)
    listed = [types.Tool(name=t.name, description=t.description, input_schema=t.parameters,  # reads need no approval
                         annotations=types.ToolAnnotations(read_only_hint=not t.needs_approval)) for t in tools]

    async def on_list_tools(ctx, params) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(ctx, params) -> types.CallToolResult:
        tool = by_name.get(params.name)
        try:
            if tool is None:
                raise ToolError(f"there is no tool named {params.name!r}")
            text, failed = await tool.invoke(params.arguments or {}), False
        except ArgumentError as e:
            text, failed = f"invalid arguments for {params.name}: {e}", True
        except Exception as e:  # noqa: BLE001 — reported to the host as the call's result
            text, failed = str(e) if isinstance(e, ToolError) else f"{type(e).__name__}: {e}", True
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=failed)

    from openk2 import __version__
    return Server(name, version=__version__, on_list_tools=on_list_tools, on_call_tool=on_call_tool)


def serve_mcp(tools: list[Tool], http: str | None = None) -> None:
    """Serve `tools` over stdio, or over streamable HTTP at `http` = "HOST:PORT" (path /mcp)."""
    import anyio

    server = mcp_server(tools)
    if http:
        import uvicorn

        host, _, port = http.rpartition(":")
        uvicorn.run(server.streamable_http_app(host=host), host=host, port=int(port), log_level="warning")
        return

    async def stdio():
        from mcp.server.stdio import stdio_server

        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(stdio)
