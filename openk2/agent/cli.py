"""`openk2 agent` and `openk2 mcp-server`: their flags, the model client each run uses, and the loop.

`openk2 agent` talks to `--endpoint URL` (any OpenAI-compatible server), a checkpoint PATH (our Engine
in this process: the model is loaded and stepped on one thread of its own, the loop runs on the main
one) or `--script FILE` (played-back turns, for demos and tests). Interactive by default; `-p TASK`
runs one task and prints the answer on stdout (progress on stderr). Each episode is appended to the
trajectory file as one JSONL record. The terminal display and approvals are terminal.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from pathlib import Path

from openk2.sampling import K2_TEMPERATURE

DEFAULT_TRAJECTORY = Path.home() / ".openk2" / "trajectories.jsonl"
SYSTEM = ("You are Kimi, an AI assistant created by Moonshot AI, working in the user's workspace {workspace} "
          "through tools (paths are relative to it). Use the tools when they help, several at once when they are "
          "independent; check results before relying on them; answer plainly when the task is done.")


def add_parsers(sub, load) -> None:
    """The `agent` and `mcp-server` subcommands; `load(path, expert_cache_gb)` -> (model, tokenizer)."""
    s = sub.add_parser("agent", help="an agent with tools: files, sandboxed code, sub-agents, MCP servers")
    s.add_argument("path", nargs="?", help="checkpoint folder or preset, run in this process (or use --endpoint)")
    s.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--model", help="model name at the endpoint (default: its first)")
    s.add_argument("--api-key", help="the endpoint's key (default: $OPENAI_API_KEY)")
    s.add_argument("--script", help="a JSON list of assistant turns to play back instead of a model")
    s.add_argument("-p", "--prompt", help="run this one task, print the answer and exit")
    s.add_argument("--workspace", default=".", help="the directory the tools work in (default: .)")
    s.add_argument("--mcp", action="append", default=[], metavar="SERVER",
                   help='an MCP server: a command ("npx -y server arg") or an http(s)://…/mcp URL; repeatable')
    s.add_argument("--tools", help="comma-separated built-in tools to offer (default: all)")
    s.add_argument("--yes", action="store_true", help="run shell, code and write tools without asking")
    s.add_argument("--unsafe-sandbox", action="store_true", help="run code without isolation where it is unavailable")
    s.add_argument("--max-turns", type=int, default=50, help="model calls per task")
    s.add_argument("--max-tokens", type=int, help="generated tokens per task")
    s.add_argument("--max-seconds", type=float, help="wall-clock seconds per task")
    s.add_argument("--turn-tokens", type=int, default=4096, help="max_tokens of each model call")
    s.add_argument("--context-window", type=int, help="the model's context, for compaction (default: the server's)")
    s.add_argument("--temperature", type=float, default=K2_TEMPERATURE,
                   help=f"sampling temperature (K2's recommended {K2_TEMPERATURE})")
    s.add_argument("--system", help="system prompt (default: a short one naming the workspace)")
    s.add_argument("--trajectory", default=str(DEFAULT_TRAJECTORY), help="append each episode here (JSONL)")
    s.add_argument("--no-trajectory", action="store_true", help="do not record episodes")
    s.add_argument("--quantize", choices=["int8", "int4"], help="in-process model: quantize the weights")
    s.add_argument("--strict-tools", action="store_true", help="calls held to the declared tools' schemas")
    s.add_argument("--expert-cache", type=float, metavar="GB", help="in-process: routed experts on disk, GB cached")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="in-process model: compiled decode (a minute of compiling first)")
    s.set_defaults(fn=lambda args: agent_command(args, lambda: load(args.path, args.expert_cache)))
    s = sub.add_parser("mcp-server", help="the built-in tools (files, sandboxed code) as an MCP server")
    s.add_argument("--workspace", default=".", help="the directory the tools work in (default: .)")
    s.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP at http://HOST:PORT/mcp (default: stdio)")
    s.add_argument("--tools", help="comma-separated built-in tools to offer (default: all)")
    s.add_argument("--unsafe-sandbox", action="store_true", help="run code without isolation where it is unavailable")
    s.set_defaults(fn=mcp_server_command)


def names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def mcp_server_command(args) -> None:
    from openk2.agent.builtin import builtin_tools
    from openk2.agent.mcp import serve_mcp

    host, _, port = (args.http or "").rpartition(":")
    if args.http and not (host and port.isdigit()):
        raise SystemExit(f"openk2 mcp-server: --http wants HOST:PORT, e.g. 127.0.0.1:9000, not {args.http!r}")
    tools, sandbox = builtin_tools(args.workspace, unsafe=args.unsafe_sandbox, subagents=False, names=names(args.tools))
    print(f"[openk2] mcp-server: {len(tools)} tools on {Path(args.workspace).resolve()}; {sandbox.describe()}",
          file=sys.stderr, flush=True)
    try:
        serve_mcp(tools, args.http)
    except KeyboardInterrupt:  # the usual way to stop a server by hand
        raise SystemExit(130) from None


def in_process_client(load, args, sequences: int = 1):
    """An EngineClient whose model is loaded, warmed up and stepped on a thread of its own (one OpenMP
    pool: the thread that loads a model is the one that runs it), its cache room for `sequences` full
    contexts at once; the stop event ends that thread."""
    from openk2.agent.client import EngineClient
    from openk2.server import make_engine
    from openk2.server.chat_format import ChatFormat
    from openk2.server.engine_loop import EngineLoop

    ready, stop, box = threading.Event(), threading.Event(), {}

    def main():
        try:
            model, tokenizer = load()
            engine = make_engine(model, args.quantize, compile=args.compile,
                                 cache_tokens=sequences * model.cfg.max_position_embeddings)
            fmt = ChatFormat.for_model(model, tokenizer, args.path)
            box["client"] = EngineClient(EngineLoop(engine), fmt, name=Path(args.path).name,
                                         strict_tools=args.strict_tools)
        except BaseException as e:  # noqa: BLE001 — re-raised on the caller's thread
            box["error"] = e
        ready.set()
        if "client" in box:
            box["client"].loop.run_here(keep_going=lambda: not stop.is_set())

    threading.Thread(target=main, name="openk2-engine", daemon=True).start()
    ready.wait()
    if "error" in box:
        raise box["error"]
    return box["client"], stop


def make_client(args, load):
    """(client, a stop event or None) for the flags given."""
    from openk2.agent.client import OpenAIClient, ScriptedClient

    given = [x for x in (args.path, args.endpoint, args.script) if x]
    if len(given) != 1:
        raise SystemExit("openk2 agent: give one of a checkpoint PATH, --endpoint URL or --script FILE")
    if args.script:
        try:
            turns = json.loads(Path(args.script).read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"openk2 agent: --script {args.script}: {e}")
        return ScriptedClient(turns, context_window=args.context_window or 131072), None
    if args.endpoint:
        return OpenAIClient(args.endpoint, args.model, args.api_key, args.context_window,
                            strict_tools=args.strict_tools), None
    return in_process_client(load, args)


def agent_command(args, load) -> None:
    """`openk2 agent`; `load()` -> (model, tokenizer) for a checkpoint PATH (given by openk2.cli)."""
    from openk2.agent.terminal import session

    workspace = Path(args.workspace).resolve()
    if not workspace.is_dir():
        raise SystemExit(f"openk2 agent: the workspace {args.workspace} is not a directory")
    stop = None
    try:
        client, stop = make_client(args, load)
        code = asyncio.run(session(args, client, workspace, SYSTEM.format(workspace=workspace), names(args.tools)))
    except KeyboardInterrupt:
        code = 130
    finally:
        if stop is not None:
            stop.set()
    raise SystemExit(code)
