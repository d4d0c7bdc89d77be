"""Agents: the tool-use loop K2 was trained for (runtime.py), model clients over HTTP, in process and
scripted (client.py), tools from typed functions (tools.py), workspace files (files.py), sandboxed code
(sandbox.py, jail.py), sub-agents (subagents.py), compaction (compact.py), MCP both ways (mcp.py) and
the `openk2 agent` / `openk2 mcp-server` commands (cli.py, terminal.py). Needs the `agent` extra.
Names are imported on first use, so `openk2 --help` does not load the loop's dependencies."""

import importlib

EXPORTS = {"Agent": "runtime", "Budget": "runtime", "Completion": "client", "EngineClient": "client",
           "OpenAIClient": "client", "ScriptedClient": "client", "Episode": "episode", "write_jsonl": "episode",
           "Tool": "tools", "ToolContext": "tools", "tool": "tools"}
__all__ = sorted(EXPORTS)


def __getattr__(name):
    if name not in EXPORTS:
        raise AttributeError(f"module 'openk2.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(f"openk2.agent.{EXPORTS[name]}"), name)
