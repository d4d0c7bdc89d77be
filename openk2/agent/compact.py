"""Context compaction: when the conversation nears the model's context, old turns are summarised by the
model itself and replaced by the summary (long agent runs, as K2.6's do).

Kept verbatim: the leading system messages, the task (the first user message), the most recent
messages (`Agent.keep_recent`, never starting inside a turn: a tool result stays with the call that
asked for it) and every assistant message whose calls have no result yet. The summary goes in as a
system message where the old turns were. The episode's transcript keeps everything; `compactions`
records each summary and what it replaced, so the context at any turn can be rebuilt.
"""

from __future__ import annotations

import json

SUMMARY_SYSTEM = ("You compact an agent's working memory. Summarise the conversation below for the agent "
                  "that will continue it: the user's goal, what was done and found (files, commands, results, "
                  "numbers, errors), decisions taken and what remains to do. Be specific and brief; no preamble.")
SUMMARY_HEADER = "Summary of the earlier conversation (older turns were compacted):\n"
SUMMARY_TOKENS = 1024


def near_context(agent, used: int, max_tokens: int) -> bool:
    """True when `used` tokens are past `compact_at` of the window, or the next reply would not fit."""
    window = agent.client.context_window
    return used > agent.compact_at * window or used + min(max_tokens, SUMMARY_TOKENS) > window


def split(context: list[dict], keep_recent: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(head, old, recent): head = leading system messages + the first user message; recent = the
    last `keep_recent` messages, widened so that no tool result is parted from its call."""
    h = 0
    while h < len(context) and context[h]["role"] == "system":
        h += 1
    h += h < len(context) and context[h]["role"] == "user"
    cut = max(h, len(context) - keep_recent)
    while h < cut < len(context) and context[cut]["role"] == "tool":
        cut -= 1
    answered = {m.get("tool_call_id") for m in context if m["role"] == "tool"}
    for i in range(h, cut):  # an assistant message waiting for results is never summarised away
        if any(c["id"] not in answered for c in context[i].get("tool_calls") or []):
            cut = i
            break
    return context[:h], context[h:cut], context[cut:]


def transcript_text(messages: list[dict], limit: int) -> str:
    """The messages as plain text for the summariser, each cut to `limit` characters."""
    lines = []
    for m in messages:
        text = m.get("content") or ""
        text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
        calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls") or []]
        who = f"tool {m.get('name', '')}".strip() if m["role"] == "tool" else m["role"]
        body = (text[:limit] + " …" if len(text) > limit else text) + "".join(f" [calls {c[:limit]}]" for c in calls)
        lines.append(f"{who}: {body}")
    return "\n".join(lines)


async def compact(agent, ep) -> bool:
    """Summarise the old part of `ep.context` with the agent's model; False if there is nothing to drop."""
    head, old, recent = split(ep.context, agent.keep_recent)
    if not old:
        return False
    window, limit = agent.client.context_window or 1 << 30, 4000
    while True:  # shrink what each old message contributes until the request fits beside the summary
        request = [{"role": "system", "content": SUMMARY_SYSTEM},
                   {"role": "user", "content": transcript_text(old, limit)}]
        if agent.client.count_tokens(request) + SUMMARY_TOKENS < window or limit <= 64:
            break
        limit //= 2
    before = agent.client.count_tokens(ep.context, ep.tools)
    c = await agent.complete(ep, request, None, SUMMARY_TOKENS, kind="compaction")
    summary = {"role": "system", "content": SUMMARY_HEADER + (c.message.get("content") or "").strip()}
    ep.context[:] = head + [summary] + recent
    ep.compactions.append({"turn": len(ep.turns), "summary": summary["content"], "replaced": len(old),
                           "tokens_before": before, "tokens_after": agent.client.count_tokens(ep.context, ep.tools)})
    agent._emit("compacted", **ep.compactions[-1])
    return True
