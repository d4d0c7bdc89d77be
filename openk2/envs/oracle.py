"""The programmatic solver of a task's plan, and the scripted user who asks its follow-ups.

A plan is a list of steps `{"tool", "arguments", "turn", "group", "report"}`: `turn` is the user
turn it answers, steps of one `group` run in parallel, and an argument may be `{"$from": [step,
"items.0.sku"]}`, a value read from an earlier step's result. `Oracle.act` looks at what happened so
far in the current user turn (rounds of calls and their result texts) and returns the next calls or
the answer; it retries a call whose error says "try again" and follows a list's `next_offset`. So one
solver serves both `Oracle.solve(world)` (direct calls: task generation and tests) and
`Oracle.reply(messages, tools)`, a `ScriptedClient` turn that plays the teacher in the agent loop.
"""

from __future__ import annotations

import json
import random

from openk2.agent.tools import ToolError
from openk2.envs.spec import load, op_params

LEADS = ("Here is what I found: ", "Done. ", "All set. ", "")


def fmt(value) -> str:
    """A value as text: floats without a trailing .0, the rest as str."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def in_order(args: dict, names) -> dict:
    """`args` with the keys in `names` first, in that order (the tool schema's: a strict grammar writes
    properties in the schema's order), then any others."""
    return {**{k: args[k] for k in names if k in args}, **args}


def merged(pages: list) -> dict:
    """One step's result over its pages (a paginated list's items joined)."""
    if pages and "items" in pages[0]:
        return {"items": [item for p in pages for item in p["items"]]}
    return pages[-1] if pages else {}


def lookup(result, path: str):
    for part in path.split("."):
        result = result[int(part)] if isinstance(result, list) else result[part]
    return result


class Oracle:
    def __init__(self, task):
        self.task, self.spec = task, load(task.domain)

    def resolve(self, args: dict, results: dict) -> dict:
        out = {}
        for k, v in args.items():
            if isinstance(v, dict) and "$from" in v:
                step, path = v["$from"]
                v = lookup(merged(results.get(step, [])), path)
            out[k] = v
        return out

    def _pending(self, turn: int, results: dict, done: set) -> list[tuple[int, dict]]:
        open_steps = [i for i, s in enumerate(self.task.plan) if s["turn"] == turn and i not in done]
        if not open_steps:
            return []
        group = min(self.task.plan[i]["group"] for i in open_steps)
        out = []
        for i in (i for i in open_steps if self.task.plan[i]["group"] == group):
            args = self.resolve(self.task.plan[i]["arguments"], results)
            if results.get(i) and "next_offset" in results[i][-1]:
                args["offset"] = results[i][-1]["next_offset"]
            out.append((i, in_order(args, op_params(self.spec, self.task.plan[i]["tool"])[0])))
        return out

    def act(self, turn: int, rounds: list[list[str]]) -> list[tuple[str, dict]] | tuple[str, list]:
        """The next calls [(tool, arguments)], or (answer, values it mentions) when the turn is done;
        `rounds`: the result texts of each earlier round of this turn, in call order."""
        results, done = {}, set()
        for texts in rounds:
            for (i, _), text in zip(self._pending(turn, results, done), texts):
                if text.startswith("Error:"):
                    done.update(() if "try again" in text else (i,))
                    continue
                results.setdefault(i, []).append(page := json.loads(text))
                done.update(() if "next_offset" in page else (i,))
        if pending := self._pending(turn, results, done):
            return [(self.task.plan[i]["tool"], args) for i, args in pending]
        return self.answer(turn, results)

    def answer(self, turn: int, results: dict) -> tuple[str, list]:
        facts, values = [], list(self.task.notes[turn] if turn < len(self.task.notes) else [])
        for i, step in enumerate(self.task.plan):
            report, result = step.get("report") or [], merged(results.get(i, []))
            if self.task.kind == "missing" and step["turn"] == turn and i not in results:
                facts.append(self.not_found(step))  # its call failed for good: a record that is not there
                continue
            if step["turn"] != turn or not report:
                continue
            if "items" in result:
                found = [item[report[0]] for item in result["items"]]
                facts.append(f"{len(found)} found: {', '.join(map(fmt, found))}" if found else "none found")
                values += found
            else:
                facts += [f"{f.replace('_', ' ')}: {fmt(result[f])}" for f in report]
                values += [result[f] for f in report]
        if not facts and not values:  # only writes with nothing to report: name what each acted on
            facts = [self.acted_on(i, results) for i, s in enumerate(self.task.plan)
                     if s["turn"] == turn and self.spec["operations"][s["tool"]]["kind"] not in ("get", "list")]
            facts = facts or [f"{', '.join(s['tool'] for s in self.task.plan if s['turn'] == turn)} went through"]
        lead = "" if self.task.kind == "missing" else random.Random(f"{self.task.id}:{turn}").choice(LEADS)
        return lead + "; ".join(facts or map(fmt, values)) + ".", values

    def entity_of(self, step: dict) -> dict:
        """The spec of the entity that a step's operation acts on (its key, mention and fields)."""
        return self.spec["entities"][self.spec["operations"][step["tool"]]["entity"]]

    def acted_on(self, i: int, results: dict) -> str:
        """Write step `i` that reports nothing, in words: "delete_file went through for the file docs/plan.md"."""
        entity = self.entity_of(step := self.task.plan[i])  # its record's key: from the call, else its result
        key = self.resolve(step["arguments"], results).get(entity["key"], merged(results.get(i, [])).get(entity["key"]))
        record = "" if key is None else " for " + entity["mention"].format(fmt(key))
        return f"{step['tool']} went through{record}"

    def not_found(self, step: dict) -> str:
        """What the answer says of a step whose record does not exist: "There is no product SKU-1"."""
        entity = self.entity_of(step)
        return f"There is no {entity['mention'].format(fmt(step['arguments'][entity['key']]))}"

    def solve(self, world) -> tuple[list[dict], list[str], list[list]]:
        """Run the plan against `world` directly: (calls as `calls_of` gives them, with `error` where a
        call failed; the answers; the values each answer mentions)."""
        calls, answers, mentions, n = [], [], [], 0
        for turn in range(len(self.task.turns)):
            rounds = []
            while not isinstance(act := self.act(turn, rounds), tuple):
                if len(rounds) >= 12:
                    raise RuntimeError(f"task {self.task.id}: the plan is not done after 12 rounds of calls")
                texts = []
                for name, args in act:
                    call = {"name": name, "arguments": args, "turn": n}
                    try:
                        texts.append(json.dumps(world.call(name, args)))
                    except ToolError as e:
                        texts.append(f"Error: {e}")
                        call["error"] = str(e)
                    calls.append(call)
                rounds.append(texts)
                n += 1
            answers.append(act[0])
            mentions.append(act[1])
            n += 1
        return calls, answers, mentions

    def reply(self, messages: list[dict], tools=None) -> dict:
        """The next assistant turn of the conversation so far, as `ScriptedClient` takes it."""
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
        rounds = [[results.get(c["id"], "Error: no result") for c in m["tool_calls"]]
                  for m in messages[users[-1]:] if m["role"] == "assistant" and m.get("tool_calls")]
        act = self.act(len(users) - 1, rounds)
        if isinstance(act, tuple):
            return {"content": act[0]}
        n = sum(len(m.get("tool_calls") or []) for m in messages)
        return {"tool_calls": [{"id": f"functions.{name}:{n + k}", "type": "function",
                                "function": {"name": name, "arguments": json.dumps(args)}}
                               for k, (name, args) in enumerate(act)]}


class ScriptedUser:
    """The user simulator of a task: after the assistant's answer to turn t, it says turn t+1's text."""

    def __init__(self, task):
        self.task = task

    async def __call__(self, episode) -> str | None:
        asked = sum(m["role"] == "user" for m in episode.transcript)
        return self.task.turns[asked] if asked < len(self.task.turns) else None
