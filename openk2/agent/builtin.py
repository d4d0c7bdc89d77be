"""The built-in tool set of `openk2 agent` and `openk2 mcp-server`: the workspace file tools
(files.py), sandboxed Python and shell (sandbox.py) and, for the agent, sub-agents (subagents.py)."""

from __future__ import annotations

from openk2.agent.files import Workspace
from openk2.agent.sandbox import Limits, Sandbox
from openk2.agent.subagents import task_tool
from openk2.agent.tools import Tool


def builtin_tools(workspace, limits: Limits | None = None, unsafe: bool = False, subagents: bool = True,
                  names: list[str] | None = None) -> tuple[list[Tool], Sandbox]:
    """(tools, their sandbox); `names` keeps only those tools, in their order (unknown names: ValueError)."""
    sandbox = Sandbox(workspace, limits or Limits(), unsafe=unsafe)
    tools = Workspace(workspace).tools() + sandbox.tools() + ([task_tool()] if subagents else [])
    if names is None:
        return tools, sandbox
    by_name = {t.name: t for t in tools}
    if unknown := [n for n in names if n not in by_name]:
        raise ValueError(f"unknown built-in tools {unknown}; they are: {', '.join(by_name)}")
    return [by_name[n] for n in names], sandbox
