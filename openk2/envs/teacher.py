"""The programmatic teacher of `openk2 synth`: the oracle with natural-language variety, and slips.

`Teacher` solves a task from its plan (oracle.py) and varies what an LLM teacher would: a short thought
before a round of calls (by what came before it: the first round, a retry, a next page, a next step)
and the lead of each answer, seeded by (seed, task, position), so data is the same for the same seed.
Each calling turn then says its calls' values in words ("Calling get_account with account_id ACC-5062."):
a small model learns to copy a value into prose, then into the arguments, in half the SFT steps (README).
A sum asked without tools is worked column by column (`worked_sum`): one digit is one token here, and
a small model that cannot recall 38 + 27 can follow one-digit steps (README, ninth measurement).

Slips: with `slips` = P, a share P of episodes (drawn per attempt, so `--tries` samples again) goes
wrong once, in one of the ways an LLM teacher goes wrong (SLIPS): a wrong argument value, a wrong tool,
no call at all, giving up on a transient error instead of retrying, or an answer without the values.
They are what the judge is for: the rubric rejects each, and `--keep-failed` shows what keeping them
costs. With P = 0 (the default) the teacher never errs.

Corrections: with `corrections` = C, a share C of the episodes without a slip makes one call that the
tools refuse before it runs (CORRECTIONS: a tool of the world that the task does not declare, or
arguments against the tool's schema) and then corrects it, reading the tools off the error: "There is
no place_order here; the tools are get_order, restock, list_orders, and restock is the one for this."
(or the arguments: "I sent restock bad arguments; it takes sku (required), amount (required).")
The refused tool is never one that makes a held-out combination (split "combo") with the task's
tools: the data would show it failing right where the held-out tasks need it. (A made-up name in its
place taught nothing: the fix then names the tool the model meant anyway, and a model so trained
repeats the fix's words around the same wrong call; README, nineteenth measurement.) The plan never
sees the refused round, so the rest of the episode is the oracle's. `openk2 synth` writes the refused
turn with weight 0 and the judge overlooks it (judge.corrected_turns): the data shows the error and
trains only the recovery. With `repeats` = R, a share R of those episodes makes the refused call once
more, the same call after a fix's words (as a model caught in a loop does), before the fix: "place_order
failed twice. Of get_order, restock, list_orders, restock fits." Both refused turns are weight 0.
"""

from __future__ import annotations

import json
import random
import re
from itertools import combinations

from openk2.envs.oracle import LEADS, Oracle
from openk2.envs.spec import op_params
from openk2.envs.splits import held_out_combo

SUM = re.compile(r"(\d+) \+ (\d+)\?")

ANSWERS = ("{0}", "Here is what I found: {0}", "Done. {0}", "All set. {0}", "I checked: {0}", "Sure. {0}",
           "{0} Anything else?", "That's done. {0}", "OK. {0}", "Here you go. {0}")
THOUGHTS = {  # a short thought before a round of calls, by what came before it in this turn
    "first": ("", "", "Let me check that.", "On it.", "Let me look that up.", "Sure, one moment."),
    "retry": ("That failed temporarily; trying again.", "A transient error, so I'll retry.",
              "The service asked me to try again."),
    "page": ("Only part of the results came back; reading the next page.", "There are more results; fetching them.",
             "The list continues, so I'll ask for the rest."),
    "next": ("Now with what I found.", "Next step.", "Using that result.", ""),
}
MISSING = ("{0}", "I checked. {0}", "Sorry. {0}", "{0} Could the id be mistyped?")  # leads of a not-found answer
SLIPS = ("wrong_args", "wrong_tool", "no_call", "no_retry", "vague_answer")
GIVE_UPS = ("The service is not working right now; please try again later.", "That failed, sorry.",
            "I could not get that done: the tool returned an error.")
VAGUE = ("Done.", "All set, that went through.", "I have taken care of it.")
CORRECTIONS = ("unknown_tool", "bad_arguments")
FIXES = {  # the thought before the corrected call, by the mistake the tools refused
    "unknown_tool": ("There is no {bad} here; the tools are {tools}, and {good} is the one for this.",
                     "{bad} is not one of my tools ({tools}), so {good}.",
                     "No {bad} here. Of {tools}, {good} fits."),
    "bad_arguments": ("Those arguments do not fit {good}; its arguments are {args}.",
                      "I sent {good} bad arguments; it takes {args}.",
                      "The call was malformed; {good} takes {args}, so trying again."),
}
FIXES_AGAIN = {  # the thought before the corrected call when the refused call was made twice
    "unknown_tool": ("{bad} was refused again; the tools are {tools}, and {good} is the one for this.",
                     "Not {bad} again: it is not one of my tools ({tools}), so {good}.",
                     "{bad} failed twice. Of {tools}, {good} fits."),
    "bad_arguments": ("The same arguments failed twice; {good} takes {args}.",
                      "{good} refused those arguments again; its arguments are {args}.",
                      "That call was malformed twice; {good} takes {args}."),
}


def held_out_with(tool: str, tools) -> bool:
    """Whether `tool` makes a held-out combination of split "combo" (its default seed and share) with
    some of `tools`."""
    rest = sorted(set(tools) - {tool})
    return any(held_out_combo((tool, *others)) for k in range(1, len(rest) + 1) for others in combinations(rest, k))


def near_miss(value):
    """A plausible wrong value: a number off by a little, a string with its last character dropped."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value * 1.1 + 1, 2)
    return value[:-1] if isinstance(value, str) and len(value) > 1 else value


def say_calls(calls: list[dict]) -> str:
    """A round of calls in words, each with its arguments in order: "Calling transfer with from_account
    ACC-1, amount 20.5; get_account with account_id ACC-2." Strings and numbers as written in the JSON
    arguments (strings unquoted), other values as JSON."""
    said = []
    for call in calls:
        args = json.loads(call["function"]["arguments"] or "{}")
        pairs = ", ".join(f"{k} {v if isinstance(v, str) else json.dumps(v)}" for k, v in args.items())
        said.append(call["function"]["name"] + (f" with {pairs}" if pairs else ""))
    return "Calling " + "; ".join(said) + "."


def worked_sum(a: int, b: int) -> str:
    """a + b worked column by column from the ones, as a small model can follow digit by digit (one
    digit is one token): "38 + 27: 8 + 7 = 15, carry 1; 3 + 2 + 1 = 6. So 38 + 27 = 65." """
    x, y, steps, digits, carry = str(a)[::-1], str(b)[::-1], [], "", 0
    width = max(len(x), len(y))
    for i in range(width):
        p, q = (int(d[i]) if i < len(d) else 0 for d in (x, y))
        total, terms = p + q + carry, f"{p} + {q}" + f" + {carry}" * bool(carry)
        if i == width - 1:
            steps.append(f"{terms} = {total}")
            digits = str(total) + digits
        else:
            carry = total // 10
            steps.append(f"{terms} = {total}" + ", carry 1" * carry)
            digits = str(total % 10) + digits
    return f"{a} + {b}: {'; '.join(steps)}. So {a} + {b} = {digits}."


class Teacher(Oracle):
    """The oracle with variety, seeded by (seed, task, position in the dialog); `slips`: the share of
    episodes (per `attempt`) that go wrong once; `corrections`: the share of the others drawn to make
    a refused call and correct it (in a one-call round, each with even odds until one does); `repeats`:
    the share of those that make the refused call twice before the fix."""

    def __init__(self, task, seed: int = 0, slips: float = 0.0, attempt: int = 0, corrections: float = 0.0,
                 repeats: float = 0.0):
        super().__init__(task)
        self.seed = seed
        draw = self.rng(f"slip:{attempt}")
        self.slip = draw.choice(SLIPS) if slips and draw.random() < slips else None
        self.slipped, self.slipped_call = False, None
        draw = self.rng(f"correct:{attempt}")
        self.correction = (draw.choice(CORRECTIONS) if corrections and not self.slip and draw.random() < corrections
                           else None)
        self.refused, self.fixing = set(), None  # the refused calls' ids; (mistake, name) the next round fixes
        self.repeat = bool(self.correction and repeats and self.rng(f"repeat:{attempt}").random() < repeats)
        self.bad = None  # the refused call's function, while it is still to be made again

    def rng(self, where) -> random.Random:
        return random.Random(f"{self.seed}:{self.task.id}:{where}")

    def answer(self, turn: int, results: dict) -> tuple[str, list]:
        text, values = super().answer(turn, results)
        if not self.task.plan and (m := SUM.search(self.task.turns[turn])) and values == [int(m[1]) + int(m[2])]:
            return worked_sum(int(m[1]), int(m[2])), values  # a sum without a tool: worked, not recalled
        if values and self._slips("vague_answer"):
            return self.rng(f"vague:{turn}").choice(VAGUE), values
        body = next((text[len(lead):] for lead in LEADS if lead and text.startswith(lead)), text)
        leads = MISSING if self.task.kind == "missing" else ANSWERS
        return self.rng(f"answer:{turn}").choice(leads).format(body), values

    def _slips(self, kind: str) -> bool:
        """Whether to make this episode's slip now (once, and only the one drawn)."""
        if self.slip != kind or self.slipped:
            return False
        self.slipped = True
        return True

    def reply(self, messages: list[dict], tools=None) -> dict:
        if self.slipped_call and any(m.get("tool_call_id") == self.slipped_call and "try again" in m["content"]
                                     for m in messages[-4:]):
            self.slipped = False  # the wrong call met a transient error and did nothing: slip on its retry
        planned = [m for m in messages if m.get("tool_call_id") not in self.refused
                   and not any(c["id"] in self.refused for c in m.get("tool_calls") or [])]
        try:
            out = super().reply(planned, tools)  # the plan goes on as if the refused round had not happened
        except (KeyError, IndexError, TypeError, ValueError):  # after a slip: a result the plan cannot read
            return {"content": self.rng(f"lost:{len(messages)}").choice(GIVE_UPS)}
        if not (calls := out.get("tool_calls")):
            return out
        n = sum(len(m.get("tool_calls") or []) for m in messages)  # ids number every call, refused ones too
        for k, call in enumerate(calls):
            call["id"] = f"functions.{call['function']['name']}:{n + k}"
        start = max(i for i, m in enumerate(messages) if m["role"] != "tool") + 1
        seen = " ".join(m["content"] for m in messages[start:])  # the last round's results
        kind = ("first" if messages[-1]["role"] == "user" else "retry" if "try again" in seen
                else "page" if "next_offset" in seen else "next")
        if kind == "retry" and self._slips("no_retry") or kind == "first" and self._slips("no_call"):
            return {"content": self.rng(f"give_up:{len(messages)}").choice(GIVE_UPS)}
        if self.slip in ("wrong_args", "wrong_tool"):
            call = calls[0]
            self._wrong_call(call["function"], self.rng(f"wrong:{len(messages)}"))
            call["id"] = f"functions.{call['function']['name']}:{call['id'].rsplit(':', 1)[1]}"
            self.slipped_call = call["id"] if self.slipped else None
        thought = self.rng(f"thought:{len(messages)}").choice(THOUGHTS[kind])
        if self.fixing:
            (mistake, bad), again = self.fixing, self.bad is None and self.repeat
            fix = self.rng(f"fix:{len(messages)}").choice((FIXES_AGAIN if again else FIXES)[mistake])
            error = next(m["content"] for m in reversed(messages) if m["role"] == "tool")
            listed = error.rsplit(" are: ", 1)[-1].rstrip(".")  # the tools or the arguments, copied off the error
            thought = fix.format(bad=bad, good=calls[0]["function"]["name"], tools=listed, args=listed)
            if self.bad:  # the fix's words around the same refused call; the next round fixes it
                calls[0]["function"], self.bad = self.bad, None
                calls[0]["id"] = f"functions.{bad}:{n}"
                self.refused.add(calls[0]["id"])
            else:
                self.fixing = None
        elif (self.correction and not self.refused and len(calls) == 1
              and self.rng(f"when:{len(messages)}").random() < 0.5):  # once, in a round drawn as it comes
            if mistake := self._mistake(calls[0], self.rng(f"mistake:{len(messages)}")):
                self.refused.add(calls[0]["id"])
                self.fixing = (mistake, calls[0]["function"]["name"])  # the name as called, wrong or not
                self.bad = dict(calls[0]["function"]) if self.repeat else None
        out["content"] = " ".join(filter(None, (thought, say_calls(calls))))
        return out

    def _mistake(self, call: dict, rng: random.Random) -> str | None:
        """The correction's mistake in a call, in place: a tool of the world the task does not declare
        (none that makes a held-out combination with the task's), else arguments the schema refuses (a
        required one left out, or one the tool does not take)."""
        function, ops = call["function"], self.spec["operations"]
        if self.correction == "unknown_tool" and (others := sorted(
                t for t in set(ops) - set(self.task.tools or ops) if not held_out_with(t, self.task.rubric.tools))):
            function["name"] = rng.choice(others)
            call["id"] = f"functions.{function['name']}:{call['id'].rsplit(':', 1)[1]}"
            return "unknown_tool"
        params, required = op_params(self.spec, function["name"])
        args = json.loads(function["arguments"])
        extra = sorted({k for op in ops for k in op_params(self.spec, op)[0]} - set(params))
        if (present := [k for k in required if k in args]) and (not extra or rng.random() < 0.5):
            args.pop(rng.choice(present))
        elif extra:
            args[rng.choice(extra)] = rng.choice(list(args.values()) or [1])
        else:
            return None
        function["arguments"] = json.dumps(args)
        return "bad_arguments"

    def _wrong_call(self, function: dict, rng: random.Random) -> None:
        """The slip in a call, in place: another tool of the task's toolset, or one argument a near miss."""
        others = [t for t in self.task.tools if t != function["name"]]
        if self.slip == "wrong_tool" and others and self._slips("wrong_tool"):
            function["name"] = rng.choice(others)
            return
        args = json.loads(function["arguments"])
        keys = [k for k, v in args.items() if near_miss(v) != v]
        if keys and (self._slips("wrong_args") or self._slips("wrong_tool")):  # no other tool: an argument
            key = rng.choice(keys)
            function["arguments"] = json.dumps({**args, key: near_miss(args[key])})
