"""MCP both ways, with the official SDK: our agent lists and calls the tools of our own `openk2
mcp-server` (stdio and streamable HTTP) and of a tiny server written here with the SDK's own
decorator API; the server's error results; clear errors for servers that cannot start."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

mcp = pytest.importorskip("mcp")

from openk2.agent.client import ScriptedClient  # noqa: E402
from openk2.agent.mcp import MCPTools, mcp_server  # noqa: E402
from openk2.agent.runtime import Agent  # noqa: E402
from openk2.agent.sandbox import Sandbox  # noqa: E402
from openk2.agent.tools import ArgumentError, ToolError, tool  # noqa: E402
from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END  # noqa: E402

OPENK2 = os.path.join(os.path.dirname(sys.executable), "openk2")
TINY_SERVER = '''
from mcp.server.mcpserver import MCPServer
server = MCPServer("tiny")

@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b

@server.tool()
def read_file(path: str) -> str:
    """A tool whose name clashes with openk2's."""
    return "tiny's " + path

server.run()
'''


def calls(*blocks) -> str:
    return SECTION_BEGIN + "".join(CALL_BEGIN + f"functions.{n}:{i}" + ARGUMENT_BEGIN + json.dumps(a) + CALL_END
                                   for i, (n, a) in enumerate(blocks)) + SECTION_END


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "a.txt").write_text("alpha\n")
    (tmp_path / "tiny.py").write_text(TINY_SERVER)
    return tmp_path


def test_agent_uses_our_mcp_server_and_a_tiny_sdk_server_over_stdio(workspace):
    servers = [f"{OPENK2} mcp-server --workspace {workspace / 'ws'} --tools read_file,write_file,run_python",
               f"{sys.executable} {workspace / 'tiny.py'}"]

    async def main():
        async with MCPTools(servers) as tools:
            names = [t.name for t in tools]
            assert names == ["read_file", "write_file", "run_python", "add", "tiny_read_file"]
            by_name = {t.name: t for t in tools}
            assert by_name["read_file"].parameters["required"] == ["path"]
            # approval: what our server marks read-only needs none; the tiny server's tools say nothing, so they do
            assert [t.needs_approval for t in tools] == [False, True, True, True, True]
            assert await by_name["add"].invoke({"a": 2, "b": 3}) == "5"
            assert await by_name["tiny_read_file"].invoke({"path": "x"}) == "tiny's x"
            with pytest.raises(ArgumentError):  # checked against the server's schema before the call
                await by_name["add"].invoke({"a": "two", "b": 3})
            with pytest.raises(ToolError, match="outside the workspace"):  # the server's error result
                await by_name["read_file"].invoke({"path": "../tiny.py"})
            script = [calls(("read_file", {"path": "a.txt"}), ("add", {"a": 40, "b": 2}),
                            ("write_file", {"path": "b.txt", "content": "beta"}),
                            ("run_python", {"code": "print(open('b.txt').read().upper())"})),
                      "done"]
            return await Agent(ScriptedClient(script), tools).run("go")

    ep = asyncio.run(main())
    results = [m["content"] for m in ep.transcript if m["role"] == "tool"]
    assert results[0] == "     1\talpha" and results[1] == "42" and results[2] == "wrote 4 bytes to b.txt"
    isolated = Sandbox(workspace / "ws").isolation_error() is None  # else the sandbox refuses, clearly
    assert results[3].startswith("BETA\n") if isolated else results[3].startswith("refused: code execution")
    assert ep.stop_reason == "answered" and (workspace / "ws" / "b.txt").read_text() == "beta"


def test_our_mcp_server_over_streamable_http(workspace):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([OPENK2, "mcp-server", "--workspace", str(workspace / "ws"),
                               "--http", f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)

    async def main():
        deadline = time.monotonic() + 30
        while True:
            try:
                async with MCPTools([f"http://127.0.0.1:{port}/mcp"]) as tools:
                    by_name = {t.name: t for t in tools}
                    return sorted(by_name), await by_name["list_files"].invoke({})
            except RuntimeError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                await asyncio.sleep(0.2)

    try:
        names, listing = asyncio.run(main())
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert names == ["edit_file", "list_files", "read_file", "run_python", "run_shell", "search_files", "write_file"]
    assert listing == "a.txt  (6 bytes)"


def test_server_error_results_in_process():
    @tool
    def fails(x: int) -> str:
        """Raises."""
        raise ValueError(f"bad {x}")

    async def main():
        async with mcp.Client(mcp_server([fails])) as c:
            listed = (await c.list_tools()).tools
            out = [await c.call_tool(n, a) for n, a in [("fails", {"x": 1}), ("fails", {"x": "one"}), ("nope", {})]]
            return listed, out

    listed, (raised, invalid, unknown) = asyncio.run(main())
    assert [t.name for t in listed] == ["fails"] and listed[0].input_schema["properties"]["x"] == {"type": "integer"}
    assert raised.is_error and raised.content[0].text == "ValueError: bad 1"
    assert invalid.is_error and invalid.content[0].text.startswith("invalid arguments for fails: x: 'one'")
    assert unknown.is_error and unknown.content[0].text == "there is no tool named 'nope'"


def test_servers_that_cannot_start_fail_clearly(tmp_path):
    (tmp_path / "quits.py").write_text("print('not a protocol message')\n")
    for spec, message in [("/nonexistent/mcp-server", "No such file"),
                          (f"{sys.executable} {tmp_path / 'quits.py'}", "MCP server"),
                          ("", "empty MCP server command")]:
        async def main(spec=spec):
            async with MCPTools([spec]):
                pass

        with pytest.raises((RuntimeError, OSError, ValueError), match=message):
            asyncio.run(main())
