"""Copy drills: short tool-free chats whose answer quotes values stated in the request.

A tool call copies values (ids, amounts, dates, names) from the conversation into its arguments, and
the answer copies them back from the tool's result; a model of a few million parameters pretrained for
minutes has no in-context copying yet, and the tool-use SFT spends most of its budget growing it
(README, "Agents"). `openk2 synth --drills N` adds N of these to the data: a request states two to four
named values ("order ZQ-4821, amount 310.25, date 2027-03-14") and asks for one in words or some as a
JSON object, and the answer quotes them exactly, strings as strings and numbers as numbers. The values
are generic (random codes, numbers, dates, names, words), not any world's, so no domain leaks into them.
"""

from __future__ import annotations

import json
import random
import string

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


def drills(n: int, seed: int) -> list[dict]:
    """`n` drills, the same for the same seed; meta says what they are."""
    rng = random.Random(f"drills:{seed}")
    return [{**drill(rng), "meta": {"kind": "drill", "seed": seed, "index": i}} for i in range(n)]
