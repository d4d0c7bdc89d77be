"""The judge of a trajectory: did the episode solve its task? Two implementations, one verdict shape.

- `rubric_verdict(task, world, episode)`: the programmatic judge. The task's rubric on the world's
  final state, the answers and the calls of the transcript, plus what the rubric cannot see: an
  episode that stopped for a budget, and tool calls the parser could not read. Given `overlook`
  (`corrected_turns`: calls the tools refused before they ran, corrected in the next round), it
  judges the transcript without those turns.
- `LLMJudge(client)`: an endpoint grades the trajectory against the rubric's criteria written out
  in words; it must answer with one JSON object `{"passed": bool, "reasons": [str]}`. Anything else
  (prose, a fence, a missing key, a failed request) is a reject whose reason says so.
A verdict is (passed, reasons); `category(reason)` names the kind of failure for the summaries.
"""

from __future__ import annotations

import json
import re

from openk2.envs.rubric import answers_of, calls_of
from openk2.envs.world import changes
from openk2.sampling import GREEDY

CATEGORIES = [  # (category, pattern of a reason), first match wins
    ("stopped", r"^stopped:"), ("bad_format", r"^bad format:"), ("wrong_tool", r"^wrong tool:"),
    ("wrong_args", r"^checkpoint \d+: no call .*it was called with"), ("missing_call", r"^checkpoint \d+: no call"),
    ("not_parallel", r"^checkpoint \d+: .*in one turn"), ("too_many_calls", r"tool calls, more than"),
    ("too_few_calls", r"tool calls, fewer than"), ("no_answer", r"^no answer"),
    ("wrong_answer", r"^the answer to turn"), ("judge_unparsed", r"^judge: unreadable verdict"),
    ("judge_error", r"^judge: the request failed"), ("llm_judge", r"^judge: "), ("simulator", r"^simulator: "),
    ("user_simulator", r"^user simulator: "), ("wrong_state", r""),
]
VERDICT = '{"passed": true or false, "reasons": ["one short sentence per unmet criterion"]}'


def category(reason: str) -> str:
    """The failure kind of one reason (the state reasons have no common prefix: they come last)."""
    return next(name for name, pattern in CATEGORIES if re.search(pattern, reason))


def episode_reasons(episode) -> list[str]:
    """What rejects any episode, whatever the judge: calls the parser could not read, a budget stop."""
    reasons = [f"bad format: {e['message']}" for e in episode.tool_errors if e["kind"] == "unparsed_call"]
    if episode.stop_reason != "answered":
        reasons.append(f"stopped: {episode.stop_reason} ({episode.detail})")
    return reasons


REFUSED = ("unknown_tool", "invalid_arguments")  # tool errors raised before a call runs: the world never saw it


def corrected_turns(episode, ids=None) -> list[int]:
    """The transcript indices of assistant turns whose every call the tools refused before running it
    (REFUSED; only calls of `ids` when given) and after which the next assistant turn that is not
    refused so, in the same user turn, makes a call that ran: mistakes the episode went past (a
    refused call made twice is two of them). Whether that call was right is the rubric's to say."""
    refused = {e["tool_call_id"] for e in episode.tool_errors if e["kind"] in REFUSED}
    refused = refused if ids is None else refused & set(ids)
    messages = episode.transcript

    def all_refused(m) -> bool:
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        return bool(calls) and all(c["id"] in refused for c in calls)
    out = []
    for i, m in enumerate(messages):
        if all_refused(m):
            after = next((n for n in messages[i + 1:] if n["role"] == "user"
                          or n["role"] == "assistant" and not all_refused(n)), {})
            out += [i] * any(c["id"] not in refused for c in after.get("tool_calls") or [])  # a user turn has none
    return out


def rubric_verdict(task, world, episode, overlook=()) -> tuple[bool, list[str]]:
    """The programmatic judge: (passed, reasons); the assistant turns at indices `overlook` (with
    their calls' results) are left out of what it reads."""
    skip = {c["id"] for i in overlook for c in episode.transcript[i]["tool_calls"]}
    transcript = [m for i, m in enumerate(episode.transcript)
                  if i not in overlook and m.get("tool_call_id") not in skip]
    _, reasons = task.rubric.check(world.snapshot(), answers_of(transcript), calls_of(transcript))
    reasons = episode_reasons(episode) + reasons
    return not reasons, reasons


# ---------------------------------------------------------------- the LLM judge

def criteria(task) -> str:
    """The rubric's success criteria, in words an LLM judge can apply (an LLM-written task's own)."""
    if getattr(task, "rubric", None) is None:
        return "\n".join(f"- {c}" for c in task.criteria)
    r, lines = task.rubric, []
    for n, cp in enumerate(r.checkpoints, 1):
        calls = ", ".join(f"{c['name']}({json.dumps(c['arguments'])})" for c in cp["calls"])
        lines.append(f"- checkpoint {n}: {calls}" + (" (called together, in one turn)" if cp["parallel"] else ""))
    lines.append(f"- between {r.min_calls} and {r.max_calls} tool calls in all (a retried failure counts)"
                 if r.max_calls else "- no tool call at all")
    lines += [f"- the answer to turn {t + 1} states: {', '.join(map(str, values))}"
              for t, values in enumerate(r.mentions) if values]
    lines.append(f"- the world ends with exactly these record changes (null: deleted): {json.dumps(r.changes)}"
                 if r.changes else "- the world's records end unchanged")
    return "\n".join(lines)


def transcript_text(messages: list[dict]) -> str:
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append(f"[tool result {m.get('name', '')}] {m['content']}")
            continue
        if m.get("content"):
            out.append(f"[{m['role']}] {m['content']}")
        out += [f"[assistant calls] {c['function']['name']}({c['function']['arguments']})"
                for c in m.get("tool_calls") or []]
    return "\n".join(out)


def parse_verdict(text: str | None) -> tuple[bool, list[str]]:
    """The judge's reply as a verdict; an unreadable one is a reject that says why."""
    try:
        v = json.loads(text or "")
    except json.JSONDecodeError as e:
        return False, [f"judge: unreadable verdict, not JSON ({e.msg}): {(text or '')[:80]!r}"]
    if not (isinstance(v, dict) and isinstance(v.get("passed"), bool) and isinstance(v.get("reasons", []), list)
            and all(isinstance(x, str) for x in v.get("reasons", []))):
        return False, [f"judge: unreadable verdict, expected {VERDICT}: {(text or '')[:80]!r}"]
    reasons = [f"judge: {x}" for x in v.get("reasons", [])]
    return (True, []) if v["passed"] else (False, reasons or ["judge: failed, no reason given"])


class LLMJudge:
    """An OpenAI-compatible endpoint as the judge (any `complete(messages, ...)` client)."""

    def __init__(self, client, max_tokens: int = 512):
        self.client, self.max_tokens = client, max_tokens

    def prompt(self, task, world, episode) -> list[dict]:
        changed = (f"What the conversation changed in the world (null: deleted): "
                   f"{json.dumps(changes(world, task.seed))}\n\n" if getattr(task, "rubric", None) else "")
        text = (f"Grade this tool-use conversation in the {task.domain} domain against the task's criteria.\n\n"
                f"Criteria (all must hold):\n{criteria(task)}\n\n{changed}"
                f"Conversation:\n{transcript_text(episode.transcript)}\n\n"
                f"Reply with one JSON object and nothing else: {VERDICT}")
        return [{"role": "system", "content": "You are a strict grader of assistant trajectories."},
                {"role": "user", "content": text}]

    async def __call__(self, task, world, episode) -> tuple[bool, list[str]]:
        try:
            c = await self.client.complete(self.prompt(task, world, episode), max_tokens=self.max_tokens,
                                           temperature=GREEDY, seed=task.seed)
        except Exception as e:  # noqa: BLE001 — an endpoint failure rejects this one trajectory, with why
            return False, [f"judge: the request failed: {type(e).__name__}: {e}"]
        return parse_verdict(c.message.get("content"))
