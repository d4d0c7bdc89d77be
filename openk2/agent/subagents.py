"""The `task` tool: hand a self-contained piece of work to a sub-agent with its own context and a subset
of the tools; its final answer is the tool's result. Several `task` calls in one turn run concurrently
(the loop runs a turn's calls in parallel): a small agent swarm. Each sub-agent's episode is kept in
the parent's `subagents` (for the trajectory record); depth is bounded by `Agent.max_depth`.
"""

from __future__ import annotations

import math

from openk2.agent.tools import Tool, ToolContext, tool

SUBAGENT_SYSTEM = ("You are a sub-agent. Do the task you are given with the tools you have, then answer with "
                   "the result in full: your answer is all the caller will see.")


def task_tool() -> Tool:
    @tool(timeout=math.inf)  # as long as the parent's own deadline allows
    async def task(prompt: str, ctx: ToolContext, tools: list[str] | None = None) -> str:
        """Start a sub-agent on a self-contained task and return its final answer. The sub-agent sees
        only `prompt` (not this conversation), so say everything it needs. Several task calls in one
        reply run in parallel.

        Args:
            prompt: the complete task for the sub-agent
            tools: names of the tools it may use (default: all of yours)
        """
        sub = ctx.agent.subagent(tools, system=SUBAGENT_SYSTEM)
        ep = sub.episode(prompt)
        try:
            await sub.resume(ep)
        finally:  # kept, and its tokens charged to the parent's budget, however it ended
            record = ep.record()
            ctx.episode.subagents.append({"tool_call_id": ctx.call_id, **record})
            ctx.episode.turns.append({"kind": "subagent", **record["usage"], "finish_reason": ep.stop_reason,
                                      "seconds": record["timings"]["total_s"]})
        if ep.stop_reason == "answered":
            return ep.final
        last = next((m.get("content") for m in reversed(ep.context) if m["role"] == "assistant"), None)
        return f"Error: the sub-agent stopped without an answer ({ep.stop_reason}: {ep.detail})." + \
            (f" Its last words: {last}" if last else "")

    return task
