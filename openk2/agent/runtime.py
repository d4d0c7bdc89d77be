"""The agent loop: call the model, run every tool call of its turn, append the results, repeat.

One loop for the terminal (`openk2 agent`), data synthesis and RL rollouts: `Agent.run(task)` returns
an `Episode` (the transcript in OpenAI's chat format, the stop reason, token counts, timings, tool
errors), which `Episode.record()` turns into one JSONL record. A turn's calls run concurrently and
their results go back in call order with their `tool_call_id`s. An unknown tool, arguments that are
not a JSON object or break the schema, a tool that raises or times out, a call the user declines:
each becomes an `Error: ...` text as that call's result, and the loop goes on. It stops when the model
answers without calls (and no simulated `user` follows up) or when a budget ends; `STOP_REASONS` lists
every way out (episode.py, with the record). Reasoning (`reasoning_content`) stays on the assistant
messages, so it goes back to the model as the client received it. Compaction near the context:
compact.py; sub-agents: subagents.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from openk2.agent.client import Completion, ContextLengthExceeded
from openk2.agent.compact import compact, near_context
from openk2.agent.episode import Episode
from openk2.agent.tools import ArgumentError, Tool, ToolContext, ToolError, toolbox

UNPARSED = ("The tool calls in your last reply could not be read ({errors}). Call the tools again, "
            "each with a JSON object as its arguments.")


@dataclass(frozen=True)
class Budget:
    max_turns: int = 50  # model calls
    max_tokens: int | None = None  # generated tokens over the whole episode
    max_seconds: float | None = None  # wall clock
    turn_tokens: int = 4096  # max_tokens of one call (less when the episode budget has less left)
    tool_timeout: float = 120.0  # seconds a call may run, unless its tool says otherwise
    max_result_chars: int = 40_000  # a longer tool result is cut (about 10k tokens)


class Agent:
    """A model client, tools and a budget. `approve(name, args)` is asked before tools that need it
    (none: all run); `user(episode)` may answer a final reply with a follow-up (a user simulator);
    `tool_choice` is a value or a function of the episode; `on_event(kind, data)` sees text deltas
    ("delta"), each call as it starts ("call") and ends ("result"), "turn", "compacted" and "stop"."""

    def __init__(self, client, tools: list[Tool] = (), *, system: str | None = None, budget: Budget = Budget(),
                 temperature: float | None = None, seed: int | None = None, tool_choice=None,
                 approve: Callable[[str, dict], Awaitable[bool]] | None = None,
                 on_event: Callable[[str, dict], None] | None = None,
                 user: Callable[[Episode], Awaitable[str | None]] | None = None,
                 compact_at: float = 0.75, keep_recent: int = 6, depth: int = 0, max_depth: int = 1):
        self.client, self.tools, self.system, self.budget = client, toolbox(tools), system, budget
        self.temperature, self.seed, self.tool_choice = temperature, seed, tool_choice
        self.approve, self.on_event, self.user = approve, on_event, user
        self.compact_at, self.keep_recent, self.depth, self.max_depth = compact_at, keep_recent, depth, max_depth

    def episode(self, task: str | list[dict]) -> Episode:
        messages = [{"role": "user", "content": task}] if isinstance(task, str) else list(task)
        if self.system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system})
        return Episode(messages, [t.schema() for t in self.tools.values()])

    async def run(self, task: str | list[dict]) -> Episode:
        return await self.resume(self.episode(task))

    async def resume(self, ep: Episode) -> Episode:
        """Run turns until a stop reason; cancelling the task stops it as "cancelled" (and re-raises)."""
        ep.stop_reason, t0 = None, time.monotonic()
        try:
            while ep.stop_reason is None:
                await self._turn(ep, t0)
        except asyncio.CancelledError:  # calls left unanswered get a result, so the dialog stays well formed
            open_calls = [c for c in (ep.context[-1].get("tool_calls") or []) if ep.context[-1]["role"] == "assistant"]
            ep.append(*({"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                         "content": "Error: interrupted by the user."} for c in open_calls))
            ep.stop("cancelled")
            raise
        finally:
            ep.seconds += time.monotonic() - t0
            self._emit("stop", episode=ep)
        return ep

    def _emit(self, kind: str, **data) -> None:
        if self.on_event:
            self.on_event(kind, data)

    def _left(self, ep: Episode, t0: float) -> tuple[float | None, int | None]:
        """(seconds, tokens) the budget has left; None where it sets no limit."""
        b = self.budget
        return (None if b.max_seconds is None else b.max_seconds - (time.monotonic() - t0),
                None if b.max_tokens is None else b.max_tokens - ep.completion_tokens)

    async def complete(self, ep: Episode, messages: list[dict], tools: list[dict] | None, max_tokens: int,
                       tool_choice=None, kind: str = "turn") -> Completion:
        """One model call, counted in the episode's turns (compaction calls too)."""
        start = time.monotonic()
        stream = self.on_event and (lambda part, text: self._emit("delta", part=part, text=text))  # only if shown
        c = await self.client.complete(messages, tools, tool_choice=tool_choice, max_tokens=max_tokens,
                                       temperature=self.temperature, seed=self.seed, on_delta=stream)
        ep.turns.append({"kind": kind, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                         "finish_reason": c.finish_reason, "seconds": round(time.monotonic() - start, 4)})
        if c.completion_ids is not None:
            ep.generations.append({"kind": kind, "prompt_ids": c.prompt_ids, "completion_ids": c.completion_ids,
                                   "logprobs": c.logprobs})
        return c

    async def _turn(self, ep: Episode, t0: float) -> None:
        seconds, tokens = self._left(ep, t0)
        if sum(t["kind"] == "turn" for t in ep.turns) >= self.budget.max_turns:
            return ep.stop("max_turns", f"{self.budget.max_turns} model calls")
        if seconds is not None and seconds <= 0:
            return ep.stop("wall_time", f"{self.budget.max_seconds} s")
        if tokens is not None and tokens <= 0:
            return ep.stop("max_tokens", f"{self.budget.max_tokens} generated tokens")
        max_tokens = self.budget.turn_tokens if tokens is None else min(tokens, self.budget.turn_tokens)
        choice = self.tool_choice(ep) if callable(self.tool_choice) else self.tool_choice
        try:
            deadline = None if seconds is None else time.monotonic() + seconds
            if window := self.client.context_window:  # compact when near it; never ask for more than is left
                if near_context(self, used := self.client.count_tokens(ep.context, ep.tools), max_tokens):
                    await asyncio.wait_for(compact(self, ep), seconds)
                    used = self.client.count_tokens(ep.context, ep.tools)
                max_tokens = max(1, min(max_tokens, window - used))
            c = await asyncio.wait_for(self.complete(ep, ep.context, ep.tools or None, max_tokens, choice),
                                       None if deadline is None else deadline - time.monotonic())
        except TimeoutError:
            return ep.stop("wall_time", f"{self.budget.max_seconds} s, during a model call")
        except ContextLengthExceeded as e:  # compact once more, unless that was just done
            if ep.compactions and ep.compactions[-1]["turn"] == len(ep.turns) or not await self._compact(ep):
                ep.stop("context_length", str(e))
            return
        except Exception as e:  # noqa: BLE001 — any client failure ends the episode with its message
            return ep.stop("model_error", f"{type(e).__name__}: {e}")
        self._emit("turn", completion=c)
        ep.append(c.message)
        dropped = [e for e in c.errors if not getattr(e, "returned", False)]  # a returned call reports itself
        ep.tool_errors += [{"turn": len(ep.turns), "kind": "unparsed_call", "message": e} for e in dropped]
        if calls := c.message.get("tool_calls"):
            started = time.monotonic()
            done = await asyncio.gather(*(self._call(ep, call, deadline) for call in calls))
            ep.append(*(message for message, _ in done))
            ep.tool_errors += [error for _, error in done if error]  # in call order, as the results
            ep.tools_s += time.monotonic() - started
        elif dropped and c.finish_reason != "length":
            ep.append({"role": "system", "content": UNPARSED.format(errors="; ".join(dropped))})
        elif c.finish_reason == "length":
            spent = tokens is not None and c.completion_tokens >= tokens
            ep.stop("max_tokens" if spent else "length", f"finish_reason length after {c.completion_tokens} tokens")
        elif follow_up := self.user and await self.user(ep):
            ep.append({"role": "user", "content": follow_up})
        else:
            ep.final = c.message.get("content") or ""
            ep.stop("answered")

    async def _compact(self, ep: Episode) -> bool:
        try:
            return await compact(self, ep)
        except Exception:  # noqa: BLE001 — the summary itself failed: the caller stops the episode
            return False

    async def _call(self, ep: Episode, call: dict, deadline: float | None) -> tuple[dict, dict | None]:
        """Run one call: its tool message (an error text when it could not run), and the error's record."""
        name, call_id = call["function"]["name"], call["id"]
        content, error = await self._execute(ep, call, deadline)
        self._emit("result", call=call, content=content, error=error)
        if len(content) > (cap := self.budget.max_result_chars):  # one result must not fill the context
            content = content[:cap] + f"\n[… {len(content) - cap} more characters cut]"
        message = {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}
        return message, error and {"turn": len(ep.turns), "tool_call_id": call_id, "name": name, "kind": error,
                                   "message": content}

    async def _execute(self, ep: Episode, call: dict, deadline: float | None) -> tuple[str, str | None]:
        name, raw = call["function"]["name"], call["function"]["arguments"]
        tool = self.tools.get(name)
        if tool is None:
            return f"Error: there is no tool named {name!r}; the tools are: {', '.join(self.tools) or 'none'}.", \
                "unknown_tool"
        try:
            args = json.loads(raw) if isinstance(raw, str) and raw.strip() else raw or {}
            if not isinstance(args, dict):
                raise ArgumentError("the arguments must be a JSON object")
            tool.check(args)
        except (json.JSONDecodeError, ArgumentError) as e:
            what = f"not valid JSON ({e})" if isinstance(e, json.JSONDecodeError) else str(e)
            hint = tool.arguments_hint()  # what to copy from, as the unknown tool's error lists the tools
            return (f"Error: invalid arguments for {name}: {what}" + f"; the arguments are: {hint}" * bool(hint)
                    + "."), "invalid_arguments"
        if tool.needs_approval and self.approve and not await self.approve(name, args):
            return "Error: the user declined this call.", "declined"
        timeout = tool.timeout or self.budget.tool_timeout  # math.inf: none but the episode's deadline
        timeout = timeout if deadline is None else max(0.0, min(timeout, deadline - time.monotonic()))
        self._emit("call", call=call)  # it runs now (a call refused before this shows only in its result)
        try:
            limit = None if math.isinf(timeout) else timeout
            return await asyncio.wait_for(tool.run(args, ToolContext(self, ep, call["id"])), limit), None
        except TimeoutError:
            return f"Error: {name} timed out after {timeout:.1f} s.", "timeout"
        except ToolError as e:
            return f"Error: {e}", "tool_error"
        except ArgumentError as e:  # found by the tool itself (a sub-agent's unknown tool names, say)
            return f"Error: invalid arguments for {name}: {e}.", "invalid_arguments"
        except Exception as e:  # noqa: BLE001 — the model reads what went wrong and carries on
            return f"Error: {name} failed: {type(e).__name__}: {e}", "tool_error"

    def subagent(self, tool_names: list[str] | None = None, **overrides) -> Agent:
        """An agent one level down: same client and approvals, its own context, a subset of the tools
        (the `task` tool only while depth < max_depth)."""
        depth = self.depth + 1
        if depth > self.max_depth:
            raise ToolError(f"sub-agents may nest {self.max_depth} level(s) deep")
        names = [n for n in (self.tools if tool_names is None else tool_names) if n != "task" or depth < self.max_depth]
        if unknown := [n for n in names if n not in self.tools]:
            raise ArgumentError(f"unknown tools {unknown}; the tools are: {', '.join(self.tools)}")
        on_event = self.on_event and (lambda kind, data: self.on_event(kind, {**data, "depth": depth}))
        kw = dict(system=self.system, budget=replace(self.budget, max_turns=max(1, self.budget.max_turns // 2)),
                  temperature=self.temperature, seed=self.seed, approve=self.approve, on_event=on_event,
                  compact_at=self.compact_at, keep_recent=self.keep_recent, depth=depth, max_depth=self.max_depth)
        return Agent(self.client, [self.tools[n] for n in names], **{**kw, **overrides})
