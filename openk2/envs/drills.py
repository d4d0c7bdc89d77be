"""Drills: short made-up chats for the skills tool use needs and a small model lacks. Copy drills first.

A tool call copies values (ids, amounts, dates, names) from the conversation into its arguments, and
the answer copies them back from the tool's result; a model of a few million parameters pretrained for
minutes has no in-context copying yet, and the tool-use SFT spends most of its budget growing it
(README, "Agents"). `openk2 synth --drills N` adds N of these to the data: a request states two to four
named values ("order ZQ-4821, amount 310.25, date 2027-03-14") and asks for one in words or some as a
JSON object, and the answer quotes them exactly, strings as strings and numbers as numbers. The values
are generic (random codes, numbers, dates, names, words), not any world's, so no domain leaks into them.
Below them: tool drills (`--tool-drills`, made-up tools to pick from a list), list drills
(`--list-drills`, a made-up list tool's items, one or more pages, quoted back in order, each once) and
sum drills (`--sum-drills`, sums worked one digit at a time, as the teacher answers them).
"""

from __future__ import annotations

import json
import random
import string

from openk2.envs.tasks import SUM_ASK, SYSTEM
from openk2.envs.teacher import ANSWERS, THOUGHTS, say_calls, worked_sum
from openk2.envs.world import partial_page

KEYS = ("id", "number", "code", "amount", "total", "date", "name", "owner", "title", "city", "count", "price",
        "reference", "account", "order", "item", "label", "quantity", "start", "user", "path", "unit", "value")
WORDS = ("blue", "lamp", "river", "design", "review", "budget", "north", "garden", "steel", "paper", "winter",
         "report", "launch", "market", "silver", "coffee", "planning", "sync", "kettle", "table", "notes", "trip")
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lena", "Milo", "Nia",
         "Omar", "Pia", "Ravi", "Sara", "Tomas", "Uma", "Vera", "Wes", "Yara", "Zoe")


def value(rng: random.Random):
    """One random value: a code (ABC-1234), an amount, a count, a date, a name, words or a token."""
    kind = rng.randrange(7)
    if kind == 0:
        letters, digits = rng.choices(string.ascii_uppercase, k=rng.randint(2, 4)), rng.randint(3, 5)
        return "".join(letters) + "-" + "".join(rng.choices(string.digits, k=digits))
    if kind == 1:
        return round(rng.uniform(1, 9999), 2)
    if kind == 2:
        return rng.randint(1, 500)
    if kind == 3:
        return f"20{rng.randint(20, 30)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == 4:
        return rng.choice(NAMES)
    if kind == 5:
        return " ".join(rng.sample(WORDS, rng.randint(1, 2)))
    return rng.choice(string.ascii_lowercase) + "".join(rng.choices(string.ascii_lowercase + string.digits,
                                                                     k=rng.randint(3, 7)))  # never a number


def drill(rng: random.Random) -> dict:
    """One drill conversation: {"messages": [user, assistant]}."""
    values = {k: value(rng) for k in rng.sample(KEYS, rng.randint(2, 4))}
    said = ", ".join(f"{k} {v}" for k, v in values.items())
    form = rng.randrange(3)
    if form == 0:
        key = rng.choice(list(values))
        user, answer = f"{said}. What is the {key}?", f"The {key} is {values[key]}."
    elif form == 1:
        user, answer = f"Write as JSON: {said}.", json.dumps(values)
    else:
        keys = rng.sample(list(values), rng.randint(1, len(values)))
        user, answer = f"{said}. Give me the {' and '.join(keys)} as JSON.", json.dumps({k: values[k] for k in keys})
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# --- sum drills: a + b asked without tools, answered column by column as the teacher answers it ---
SUM_ASKS = ("What is {a} + {b}?", SUM_ASK, "How much is {a} + {b}?",
            "Please add these up for me: what is {a} + {b}?", "No lookup needed. What is {a} + {b}?")


def sum_drill(rng: random.Random) -> dict:
    """One sum drill: two numbers of one or two digits, half the time under the tasks' system prompt."""
    a, b = (rng.randint(0, 99) if rng.random() < 0.8 else rng.randint(0, 9) for _ in range(2))
    messages = [{"role": "user", "content": rng.choice(SUM_ASKS).format(a=a, b=b)},
                {"role": "assistant", "content": worked_sum(a, b)}]
    return {"messages": [{"role": "system", "content": SYSTEM}] * (rng.random() < 0.5) + messages}


def sum_drills(n: int, seed: int) -> list[dict]:
    """`n` sum drills, the same for the same seed."""
    rng = random.Random(f"sum-drills:{seed}")
    return [{**sum_drill(rng), "meta": {"kind": "sum_drill", "seed": seed, "index": i}} for i in range(n)]


def drills(n: int, seed: int) -> list[dict]:
    """`n` drills, the same for the same seed; meta says what they are."""
    rng = random.Random(f"drills:{seed}")
    return [{**drill(rng), "meta": {"kind": "drill", "seed": seed, "index": i}} for i in range(n)]


# --- tool drills: one request, the declared tool that does it, its values copied into the arguments ---
# Each drill declares two to five made-up tools (verb_noun) that share verbs and nouns, so that only
# the request's words pick the right one; the call copies the request's values into its arguments,
# the result comes back, and the answer quotes it. No tool name is a shipped world's (a few verbs and
# fields are shared, e.g. cancel, amount) and no word is the unseen domain's (weather): what they teach
# is reading a tool list, not any tool.
VERBS = ("cancel", "renew", "archive", "approve", "track", "refund", "assign", "close", "reopen", "rename",
         "pause", "resume", "rate", "reserve", "register", "inspect", "verify", "publish", "restore", "flag")
NOUNS = ("crate", "invoice", "parcel", "room", "badge", "license", "course", "patient", "vehicle", "recipe",
         "song", "device", "policy", "grant", "permit", "shift", "lesson", "claim", "voucher", "locker")
EXTRAS = {  # optional parameters: (JSON schema, how to draw a value)
    "quantity": ({"type": "integer", "minimum": 1, "description": "how many"}, lambda rng: rng.randint(1, 60)),
    "amount": ({"type": "number", "description": "the amount"}, lambda rng: round(rng.uniform(1, 2000), 2)),
    "date": ({"type": "string", "description": "the date, YYYY-MM-DD"},
             lambda rng: f"20{rng.randint(24, 30)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"),
    "owner": ({"type": "string", "description": "whose it is"}, lambda rng: rng.choice(NAMES)),
    "note": ({"type": "string", "description": "a short note"}, lambda rng: " ".join(rng.sample(WORDS, 2))),
    "priority": ({"type": "string", "enum": ["low", "normal", "high"], "description": "how urgent"},
                 lambda rng: rng.choice(["low", "normal", "high"])),
}
ASKS = ("Please {verb} {noun} {key}{extras}.", "Can you {verb} the {noun} {key}{extras}?",
        "{Verb} {noun} {key}{extras}, please.", "I need you to {verb} {noun} {key}{extras}.")
STATUSES = ("done", "ok", "confirmed", "pending", "queued", "approved")


def _tool(verb: str, noun: str, extras: list[str]) -> dict:
    key = f"{noun}_id"
    props = {key: {"type": "string", "description": f"the {noun}'s id, e.g. {noun[:3].upper()}-1234"},
             **{k: EXTRAS[k][0] for k in extras}}
    return {"type": "function", "function": {
        "name": f"{verb}_{noun}", "description": f"{verb.capitalize()} a {noun}, given its id.",
        "parameters": {"type": "object", "properties": props, "required": [key], "additionalProperties": False}}}


def _request(rng: random.Random, tool: dict) -> tuple[str, dict]:
    """(the request in words, the arguments it states) for a drill's tool."""
    verb, noun = tool["function"]["name"].split("_")
    props = tool["function"]["parameters"]["properties"]
    args = {f"{noun}_id": f"{noun[:3].upper()}-{rng.randint(100, 99999)}"}
    args.update({k: EXTRAS[k][1](rng) for k in props if k in EXTRAS})
    extras = [f"{k} {v}" for k, v in list(args.items())[1:]]
    said = (" with " + " and ".join(extras)) if extras else ""
    text = rng.choice(ASKS).format(verb=verb, Verb=verb.capitalize(), noun=noun, key=args[f"{noun}_id"], extras=said)
    return text, args


def _result(rng: random.Random, args: dict) -> dict:
    """What a drill's tool returns: the id it was called with, a status and, half the time, a reference."""
    key = next(iter(args))
    result = {key: args[key], "status": rng.choice(STATUSES)}
    if rng.random() < 0.5:
        result["reference"] = value(rng)
    return result


def tool_drill(rng: random.Random) -> dict:
    """One tool drill: {"messages": [system, user, assistant calling, tool result(s), answer], "tools"}."""
    verbs, nouns = rng.sample(VERBS, 3), rng.sample(NOUNS, 3)
    names = rng.sample([(v, n) for v in verbs for n in nouns], rng.randint(2, 5))  # shared words: read them
    tools = [_tool(v, n, rng.sample(sorted(EXTRAS), rng.randint(0, 2))) for v, n in names]
    chosen = rng.sample(tools, 2 if len(tools) > 2 and rng.random() < 0.3 else 1)
    asked = [_request(rng, t) for t in chosen]
    calls = [{"id": f"functions.{t['function']['name']}:{i}", "type": "function",
              "function": {"name": t["function"]["name"], "arguments": json.dumps(args)}}
             for i, (t, (_, args)) in enumerate(zip(chosen, asked))]
    results = [_result(rng, args) for _, args in asked]
    said = "; ".join(", ".join(f"{k}: {v}" for k, v in list(r.items())[1:]) for r in results)
    thought = rng.choice(THOUGHTS["first"])
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": " ".join(text for text, _ in asked)},
                {"role": "assistant", "content": " ".join(filter(None, (thought, say_calls(calls)))),
                 "tool_calls": calls},
                *({"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": json.dumps(r)}
                  for c, r in zip(calls, results)),
                {"role": "assistant", "content": rng.choice(ANSWERS).format(said + ".")}]
    return {"messages": messages, "tools": tools}


def tool_drills(n: int, seed: int) -> list[dict]:
    """`n` tool drills, the same for the same seed."""
    rng = random.Random(f"tool-drills:{seed}")
    return [{**tool_drill(rng), "meta": {"kind": "tool_drill", "seed": seed, "index": i}} for i in range(n)]


# --- list drills: a list tool's items, in pages or not, quoted back in order, each exactly once ---
# The small model's commonest failure on held-out tasks is an answer that lists a result's ids with one
# repeated or skipped ("4 found: ACC-9438, ACC-8906, ACC-8906, ACC-8906"), most of all across pages.
# Here the ids share a prefix and often digits, so only each item's own position tells them apart; the
# turn is written as the teacher writes a world's list turn (its thoughts, paging and answers).
LIST_ASKS = ("Which {nouns} does {owner} have?", "List the {nouns} of {owner}.", "What {nouns} are there for {owner}?",
             "Show me {owner}'s {nouns}.")


def _ids(rng: random.Random, noun: str, n: int) -> list[str]:
    """n distinct ids of one shape (TIC-4821), drawn to look alike: a shared digit or two, often."""
    head, out = noun[:3].upper(), []
    stem = "".join(rng.choices(string.digits, k=2))
    while len(out) < n:
        digits = (stem if rng.random() < 0.5 else "".join(rng.choices(string.digits, k=2))) \
            + "".join(rng.choices(string.digits, k=2))
        if (code := f"{head}-{digits}") not in out:
            out.append(code)
    return out


def list_drill(rng: random.Random) -> dict:
    """One list drill: {"messages": [system, user, call, page(s), answer], "tools"}: a made-up
    `list_<nouns>(owner, offset)` tool returns 2–7 items, in pages of 1–3 items in about a third of them."""
    noun, owner = rng.choice(NOUNS), rng.choice(NAMES)
    nouns = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    name, key = f"list_{nouns}", f"{noun}_id"
    tool = {"type": "function", "function": {
        "name": name, "description": f"List the {nouns} of an owner (paged: call again with offset for the rest).",
        "parameters": {"type": "object", "properties": {
            "owner": {"type": "string", "description": "whose they are"},
            "offset": {"type": "integer", "minimum": 0, "description": "where a page starts"}},
            "required": ["owner"], "additionalProperties": False}}}
    items = [{key: code, "owner": owner, "status": rng.choice(STATUSES)} for code in _ids(rng, noun, rng.randint(2, 7))]
    size = rng.randint(1, 3) if rng.random() < 0.4 else len(items)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": rng.choice(LIST_ASKS).format(nouns=nouns, owner=owner)}]
    for i, offset in enumerate(range(0, len(items), size)):
        args = {"owner": owner, **({"offset": offset} if offset else {})}
        call = {"id": f"functions.{name}:{i}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}
        thought = rng.choice(THOUGHTS["page" if offset else "first"])
        page = items[offset:offset + size]
        result = (partial_page(name, page, offset + size) if offset + size < len(items)
                  else {"items": page, "count": len(page)})
        messages += [{"role": "assistant", "content": " ".join(filter(None, (thought, say_calls([call])))),
                      "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "name": name, "content": json.dumps(result)}]
    found = ", ".join(item[key] for item in items)
    messages.append({"role": "assistant", "content": rng.choice(ANSWERS).format(f"{len(items)} found: {found}.")})
    return {"messages": messages, "tools": [tool]}


def list_drills(n: int, seed: int) -> list[dict]:
    """`n` list drills, the same for the same seed."""
    rng = random.Random(f"list-drills:{seed}")
    return [{**list_drill(rng), "meta": {"kind": "list_drill", "seed": seed, "index": i}} for i in range(n)]
