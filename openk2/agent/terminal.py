"""The terminal side of `openk2 agent`: the session (one task with -p, else a conversation of tasks),
the live display of text, tool calls and results, and approvals for tools that need them.

Ctrl-C during a task stops that task (recorded as "cancelled") and returns to the prompt; at the
prompt it leaves. Lines are read by one daemon thread at a time (leaving never waits for a line); a
line typed for a prompt that was given up goes to the next one. Model-written text is shown with its
control characters escaped, so a command cannot disguise itself. Flags and the model client: cli.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import sys
import threading


class Keyboard:
    """Terminal lines without blocking the event loop; None at end of input."""

    def __init__(self, input_fn=input, out=sys.stdout):
        self.input_fn, self.out, self.pending = input_fn, out, None  # the read in flight (a thread's future)

    async def ask(self, prompt: str) -> str | None:
        if self.pending is None:
            self.pending = concurrent.futures.Future()
            threading.Thread(target=self.read, args=(prompt, self.pending), daemon=True).start()
        elif not self.pending.done():  # a read started for an abandoned prompt is still waiting: reuse it
            self.out.write(prompt)
            self.out.flush()
        line = await asyncio.shield(asyncio.wrap_future(self.pending))  # Ctrl-C leaves the read running
        self.pending = None
        return line

    def read(self, prompt: str, into: concurrent.futures.Future) -> None:
        try:
            into.set_result(self.input_fn(prompt))
        except (EOFError, OSError):
            into.set_result(None)


def printable(text: str) -> str:
    """`text` with control characters (but newlines and tabs) escaped."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def short(text: str, limit: int = 160) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + " …"


class View:
    """Prints the agent's events as they happen; asks before tools that need approval."""

    def __init__(self, out=sys.stdout, keyboard: Keyboard | None = None):
        self.out, self.always, self.lock = out, set(), asyncio.Lock()
        self.ask = (keyboard or Keyboard(out=out)).ask
        self.color, self.mid_line = getattr(out, "isatty", lambda: False)(), False

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str, depth: int = 0) -> None:
        if self.mid_line:
            self.out.write("\n")
        self.out.write("  " * depth + text + "\n")
        self.out.flush()
        self.mid_line = False

    def event(self, kind: str, data: dict) -> None:
        depth = data.get("depth", 0)
        if kind == "delta":
            self.out.write(self.paint(data["text"], "2") if data["part"] == "reasoning" else data["text"])
            self.out.flush()
            self.mid_line = not data["text"].endswith("\n")
        elif kind == "call":
            fn = data["call"]["function"]
            self.line(self.paint(f"→ {fn['name']} {short(fn['arguments'])}", "36"), depth + 1)
        elif kind == "result":
            text = short(data["content"]) or "(no output)"
            self.line(self.paint(f"← {data['call']['function']['name']}: {text}", "31" if data["error"] else "2"),
                      depth + 1)
        elif kind == "compacted":
            self.line(self.paint(f"(context compacted: {data['tokens_before']} → {data['tokens_after']} tokens)", "2"))
        elif kind == "stop" and data["episode"].stop_reason != "answered":
            ep = data["episode"]
            self.line(self.paint(f"[stopped: {ep.stop_reason} — {ep.detail}]", "33"), depth)
        elif kind == "stop" and self.mid_line:  # end the streamed answer's line
            self.out.write("\n")
            self.mid_line = False

    async def approve(self, name: str, args: dict) -> bool:
        """y: run it; a: run this tool from now on without asking; anything else: decline."""
        async with self.lock:  # parallel calls ask one at a time
            if name in self.always:
                return True
            shown = args.get("command") or args.get("code") or json.dumps(args, ensure_ascii=False)
            self.line(self.paint(f"{name} wants to run:", "33") + "\n" + printable(str(shown)))
            answer = (await self.ask(f"allow {name}? [y]es / [n]o / [a]lways: ") or "").strip().lower()
            if answer in ("a", "always"):
                self.always.add(name)
            return answer in ("y", "yes", "a", "always")


async def session(args, client, workspace, system: str, tool_names: list[str] | None) -> int:
    """Run the agent as the flags say; the exit code: 0 when (the last) task was answered."""
    from openk2.agent.builtin import builtin_tools
    from openk2.agent.mcp import MCPTools
    from openk2.agent.episode import write_jsonl
    from openk2.agent.runtime import Agent, Budget

    one_shot = args.prompt is not None
    view = View(sys.stderr if one_shot else sys.stdout)
    tools, sandbox = builtin_tools(workspace, unsafe=args.unsafe_sandbox, names=tool_names)
    async with MCPTools(args.mcp, taken={t.name for t in tools}, cwd=str(workspace)) as extra:
        budget = Budget(max_turns=args.max_turns, max_tokens=args.max_tokens, max_seconds=args.max_seconds,
                        turn_tokens=args.turn_tokens)
        agent = Agent(client, tools + extra, system=args.system or system, budget=budget,
                      temperature=args.temperature, approve=None if args.yes else view.approve, on_event=view.event)
        view.line(view.paint(f"openk2 agent · {getattr(client, 'name', None) or 'model'} · {workspace} · "
                             f"{len(agent.tools)} tools · {sandbox.describe()}", "2"))
        def record(ep) -> None:
            try:
                args.no_trajectory or write_jsonl(args.trajectory, [ep.record()])
            except OSError as e:  # the answer matters more than its record
                view.line(view.paint(f"[trajectory not written: {e}]", "33"))

        if one_shot:
            ep = await agent.run(args.prompt)
            if not (sys.stdout.isatty() and sys.stderr.isatty()):  # on one terminal it has just streamed by
                print(ep.final if ep.final is not None else "", flush=True)
            record(ep)
            return 0 if ep.stop_reason == "answered" else 1
        return await conversation(agent, view, record)


async def conversation(agent, view: View, record) -> int:
    """Tasks typed at the prompt, each an episode continuing the same conversation."""
    loop, running, context, code = asyncio.get_running_loop(), [None], [], 0
    leave = loop.create_future()
    loop.add_signal_handler(signal.SIGINT, lambda: running[0].cancel() if running[0] else
                            leave.done() or leave.set_result(None))
    view.line("type a task; /reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a task")
    try:
        while True:
            prompt = asyncio.ensure_future(view.ask("you> "))
            await asyncio.wait([prompt, leave], return_when=asyncio.FIRST_COMPLETED)
            line = prompt.result() if prompt.done() else None
            if line is None or line.strip() == "/exit":
                return code
            if line.strip() == "/reset":
                context.clear()
                view.line("(conversation forgotten)")
                continue
            if not line.strip():
                continue
            ep = agent.episode([*context, {"role": "user", "content": line}])
            running[0] = asyncio.ensure_future(agent.resume(ep))
            try:
                await running[0]
            except asyncio.CancelledError:
                pass
            running[0] = None
            record(ep)
            context[:] = ep.context
            code = 0 if ep.stop_reason == "answered" else 1
    finally:
        loop.remove_signal_handler(signal.SIGINT)
