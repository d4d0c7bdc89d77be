"""Rubrics: what a finished task must show, checked without a model.

A `Rubric` is data (it travels in the task's JSON): the expected changes to the world's records
(against the seeded initial state, which it rebuilds), the values each answer must mention (one list
per user turn), the expected tool use as ordered checkpoints (each a set of calls, parallel when
made in one assistant turn) and bounds on the number of calls. `check(final_state, answer, calls)`
returns (passed, reasons), one reason per unmet criterion: the judge's verdict and its explanation.
`calls_of` and `answers_of` read both from an OpenAI-format transcript.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from openk2.envs.spec import load
from openk2.envs.world import initial_state

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def close(a, b) -> bool:
    """Equal, with numbers within 1e-6 relative and strings compared without case."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    return a == b


def same_args(expected: dict, actual) -> bool:
    """The call's arguments equal the expected ones (an explicit `offset: 0` counts as absent)."""
    if not isinstance(actual, dict):
        return False
    e, a = ({k: v for k, v in d.items() if not (k == "offset" and v == 0)} for d in (expected, actual))
    return e.keys() == a.keys() and all(close(e[k], a[k]) for k in e)


def mentioned(value, text: str) -> bool:
    """`text` states `value`: a string in any case; a number as it is, or rounded to two or more
    decimals (3283.39 for 3283.3871; not 3283, nor a number 0.1 % off)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return any(states(n, value) for n in NUMBER.findall(text))
    return str(value).casefold() in text.casefold()


def states(written: str, value: float) -> bool:
    n, decimals = float(written.replace(",", "")), len(written.partition(".")[2])
    if abs(n - value) <= 1e-9 * max(1.0, abs(value)):
        return True
    return decimals >= 2 and abs(n - value) <= 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(value))


def calls_of(messages: list[dict]) -> list[dict]:
    """Every tool call of a transcript: name, arguments (None when not a JSON object) and `turn`, the
    index of the assistant message that made it."""
    out, turn = [], -1
    for m in messages:
        if m.get("role") != "assistant":
            continue
        turn += 1
        for c in m.get("tool_calls") or []:
            raw = c["function"].get("arguments")
            try:
                args = json.loads(raw) if isinstance(raw, str) else raw
            except json.JSONDecodeError:
                args = None
            out.append({"name": c["function"]["name"], "arguments": args if isinstance(args, dict) else None,
                        "turn": turn})
    return out


def answers_of(messages: list[dict]) -> list[str]:
    """The assistant's answers, one per user turn it finished (its messages without calls)."""
    return [m.get("content") or "" for m in messages if m.get("role") == "assistant" and not m.get("tool_calls")]


@dataclass
class Rubric:
    domain: str
    seed: int
    changes: dict = field(default_factory=dict)  # {entity: {key: record, or None when deleted}}
    mentions: list = field(default_factory=list)  # per user turn: values the answer must state
    checkpoints: list = field(default_factory=list)  # in order: {"calls": [{"name", "arguments"}], "parallel"}
    min_calls: int = 0
    max_calls: int = 0

    @property
    def tools(self) -> list[str]:
        """The expected tool-use pattern's tools."""
        return sorted({c["name"] for cp in self.checkpoints for c in cp["calls"]})

    def expected_state(self) -> dict:
        state = initial_state(load(self.domain), self.seed)
        for entity, records in self.changes.items():
            for key, record in records.items():
                state[entity].pop(key) if record is None else state[entity].__setitem__(key, record)
        return state

    def check(self, final_state: dict, answer, calls: list[dict]) -> tuple[bool, list[str]]:
        """(passed, reasons). `answer`: the final text, or the list of answers per user turn; `calls`:
        [{"name", "arguments", "turn"}] in order (`calls_of`)."""
        answers = [answer] if isinstance(answer, str) or answer is None else list(answer)
        reasons = self._check_state(final_state) + self._check_calls(calls)
        if not any(a and a.strip() for a in answers):
            return False, reasons + ["no answer: the solver gave up or ran out of budget"]
        for turn, values in enumerate(self.mentions):
            text = answers[turn] if len(answers) == len(self.mentions) else " ".join(a or "" for a in answers)
            reasons += [f"the answer to turn {turn + 1} does not mention {v!r}"
                        for v in values if not mentioned(v, text)]
        return not reasons, reasons

    def _check_state(self, final: dict) -> list[str]:
        expected, reasons = self.expected_state(), []
        for entity in expected:
            want, got = expected[entity], final.get(entity, {})
            for key in sorted(want.keys() | got.keys(), key=str):
                if key not in got:
                    reasons.append(f"{entity} {key!r} is missing (deleted, or never created)")
                elif key not in want:
                    reasons.append(f"unexpected new {entity} {key!r}: {got[key]}")
                elif bad := [f for f in want[key] if not close(want[key][f], got[key].get(f))]:
                    reasons += [f"{entity} {key!r}: {f} is {got[key].get(f)!r}, expected {want[key][f]!r}" for f in bad]
        return reasons

    def _check_calls(self, calls: list[dict]) -> list[str]:
        reasons, tools, after = [], set(self.tools), -1
        if len(calls) > self.max_calls:
            reasons.append(f"{len(calls)} tool calls, more than the {self.max_calls} this task needs")
        if len(calls) < self.min_calls:
            reasons.append(f"{len(calls)} tool calls, fewer than the {self.min_calls} this task needs")
        reasons += [f"wrong tool: {c['name']} is not needed here" for c in calls if c["name"] not in tools]
        for n, cp in enumerate(self.checkpoints, 1):
            turns = []
            for want in cp["calls"]:
                hit = next((c for c in calls if c["name"] == want["name"] and c["turn"] > after
                            and same_args(want["arguments"], c["arguments"])), None)
                if hit:
                    turns.append(hit["turn"])
                    continue
                near = [c["arguments"] for c in calls if c["name"] == want["name"]]
                reasons.append(f"checkpoint {n}: no call {want['name']}({want['arguments']})"
                               + (f"; it was called with {near}" if near else ""))
            if cp["parallel"] and len(set(turns)) > 1:
                names = [c["name"] for c in cp["calls"]]
                reasons.append(f"checkpoint {n}: {names} should be called together, in one turn")
            after = max(turns, default=after)
        return reasons

    def to_dict(self) -> dict:
        return asdict(self)
