"""Rewards of an RL sample: verifiable (the task's rubric on the world and the answers, and the format
of the calls), budget control, and K2's self-critique rubric reward.

- `verifiable(task, ep, world)`: 1 if the rubric passes and the episode ended with an answer, else
  `partial` × the share of the plan's calls made with the right arguments (0 by default: success
  only); minus `format_penalty` × the share of the model's calls that could not be read or named no
  declared tool. The scorer is the evaluation's (`envs/evaluate.score`), so training and evaluation
  measure the same thing.
- Budget: each task kind has a token budget for the whole episode (`budget_of`); a sample that
  reaches it is cut there by the agent loop (stop reason max_tokens or length) and loses
  `budget_penalty`.
- `critique(critic, task, episodes)`: the critic — any model client: the policy itself on the same
  engine, another checkpoint, an endpoint — compares the K samples pairwise against the core,
  prescriptive and task rubrics (K2-SPEC §9) and answers A or B; a sample's reward is its share of
  wins (an unreadable verdict, or a failed critic call — two transcripts may not fit its context — is
  half a win each). Pairs alternate which sample is shown first.
"""

from __future__ import annotations

import itertools
import re

from openk2.envs.evaluate import score
from openk2.sampling import GREEDY

TRUNCATED = ("max_tokens", "length")
CORE_RUBRICS = (
    "Clarity and relevance: the reply does what the user asked and answers the question, without padding.",
    "Conversational fluency and engagement: natural, readable sentences that fit the conversation.",
    "Objective and grounded interaction: every value stated comes from a tool result or from the user.",
)
PRESCRIPTIVE_RUBRICS = (
    "No initial praise: the reply does not open by complimenting the user or the request.",
    "No explicit self-justification: the reply does not argue that it is good or correct.",
)
CRITIC_SYSTEM = ("You judge two conversations between a user and an assistant that uses tools. Decide which "
                 "assistant follows the rubrics better. Reply with one letter: A or B.")


def verifiable(task, ep, world, *, partial: float = 0.0, format_penalty: float = 0.0) -> tuple[float, dict]:
    """(reward, the evaluation's score of the episode)."""
    s = score(task, ep, world)
    reward = 1.0 if s["success"] else partial * s["arguments"] / max(1, s["expected_calls"])
    if s["calls"]:
        reward -= format_penalty * (1 - s["valid_calls"] / s["calls"])
    return reward, s


def parse_budgets(text: str, default: int) -> dict[str, int]:
    """`"chain=384,multi_turn=512"` -> {kind: tokens}, with "*" the default for the others."""
    out = {"*": default}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, n = part.partition("=")
        if not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"a budget is KIND=TOKENS with TOKENS >= 1, not {part!r}")
        out[kind.strip()] = int(n)
    return out


def budget_of(kind: str, budgets: dict[str, int]) -> int:
    return budgets.get(kind, budgets["*"])


def truncated(ep) -> bool:
    return ep.stop_reason in TRUNCATED


def task_rubrics(task) -> list[str]:
    """The task's own rubric in words: the values each answer must state, the tools it needs."""
    out = [f"The answer to request {n} states: {', '.join(map(str, values))}."
           for n, values in enumerate(task.rubric.mentions, 1) if values]
    if task.rubric.tools:
        out.append(f"The task is done with these tools: {', '.join(task.rubric.tools)}.")
    return out


def shown(ep) -> str:
    """A conversation as the critic reads it: every message after the system prompt, one per line."""
    lines = []
    for m in ep.transcript:
        if m["role"] == "system":
            continue
        text = m.get("content") or ""
        for c in m.get("tool_calls") or []:
            text += f" [calls {c['function']['name']}({c['function']['arguments']})]"
        lines.append(f"{m['role']}: {text.strip()}")
    return "\n".join(lines)


def verdict(text: str | None) -> str | None:
    """"A" or "B" from the critic's reply (its first standalone letter), else None."""
    hit = re.search(r"\b([AB])\b", text or "")
    return hit and hit.group(1)


async def critique(critic, task, episodes: list, rubrics: tuple[str, ...] = CORE_RUBRICS + PRESCRIPTIVE_RUBRICS,
                   temperature: float = GREEDY) -> list[float]:
    """Each episode's share of pairwise wins in [0, 1] under `critic`'s verdicts."""
    if len(episodes) < 2:
        return [0.5] * len(episodes)
    wins = [0.0] * len(episodes)
    listed = "\n".join(f"- {r}" for r in (*rubrics, *task_rubrics(task)))
    for n, (i, j) in enumerate(itertools.combinations(range(len(episodes)), 2)):
        first, second = (i, j) if n % 2 == 0 else (j, i)
        prompt = (f"Rubrics:\n{listed}\n\nConversation A:\n{shown(episodes[first])}\n\n"
                  f"Conversation B:\n{shown(episodes[second])}\n\nWhich assistant follows the rubrics better? "
                  "Reply A or B.")
        try:
            reply = await critic.complete([{"role": "system", "content": CRITIC_SYSTEM},
                                           {"role": "user", "content": prompt}], None, max_tokens=32,
                                          temperature=temperature)
            pick = verdict(reply.message.get("content"))
        except Exception:  # noqa: BLE001 — too long for the critic's context, an endpoint down: no verdict
            pick = None
        if pick is None:
            wins[i] += 0.5
            wins[j] += 0.5
        else:
            wins[first if pick == "A" else second] += 1
    return [w / (len(episodes) - 1) for w in wins]
