"""Renamed tools: a trajectory whose tools carry other names, so that a name must be read, not recalled.

In the worlds' data every request maps to the same tool name, and a small model learns the mapping
instead of the tool list: on an unseen combination it calls a name it has seen beside the others
(`get_order`, `get_event`) even where the list holds another (`read_file`). `rename(record, rng)`
gives every declared tool of one trajectory a new name (a synonym of its verb, a namespace prefix, or
an opaque pair of words) and writes it wherever the old one stood: the declaration, each call and its
id, each result's `name` and `tool_call_id`, and the assistant's words ("Calling fetch_account with
…"), and the runtime's error texts ("the tools are: …"). Descriptions, parameters and values stay
as they were, so the tool is found by what it does. A new name is never a name the trajectory calls
(a correction's refused tool, `teacher.py`).
`openk2 synth --rename-tools SHARE` renames that share of the kept trajectories. On the 800-step
recipe a share of 0.3 did not help (README, eleventh measurement): the recipe leaves it at 0.
"""

from __future__ import annotations

import copy
import functools
import random
import re

from openk2.envs.spec import domain_names, load
from openk2.tokenizer.toolcalls import CALL_ID

VERBS = {
    "get": ("fetch", "lookup", "show", "retrieve", "view"), "list": ("search", "find", "browse", "query"),
    "read": ("open", "load", "cat", "view"), "write": ("save", "store", "put"), "edit": ("update", "patch", "modify"),
    "delete": ("remove", "erase", "drop"), "create": ("new", "make", "book"), "reschedule": ("move", "shift"),
    "cancel": ("void", "revoke", "drop"), "open": ("new", "start", "begin"), "close": ("end", "shut", "terminate"),
    "place": ("submit", "make", "new"), "transfer": ("send_money", "move_funds", "pay"),
    "deposit": ("credit", "pay_in", "add_funds"), "withdraw": ("debit", "take_out", "cash_out"),
    "restock": ("refill", "replenish", "add_stock"), "add": ("sum", "plus", "total"),
    "multiply": ("product", "times", "mul"), "convert": ("transform", "change", "translate"),
    "percent": ("pct", "share", "ratio"), "distance": ("dist", "span", "how_far"),
}
PREFIXES = ("api", "svc", "app", "crm", "acme", "ops", "core", "v2", "my", "tool")
WORDS = ("amber", "birch", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lumen", "maple", "nectar", "onyx", "pebble", "quartz", "raven", "saffron", "tundra", "umber", "violet",
         "willow", "zephyr")
STYLES = ("verb", "prefix", "opaque")


@functools.lru_cache(maxsize=1)
def world_names() -> frozenset[str]:
    """Every tool name of every world: a new name is never one of them (it would teach a wrong tool)."""
    return frozenset(name for d in domain_names() for name in load(d)["operations"])


def new_name(name: str, style: str, rng: random.Random, prefix: str = "api") -> str:
    """A new name for tool `name` in `style`: "verb" swaps its leading verb for a synonym (get_account ->
    fetch_account; a name without a known verb gets the prefix), "prefix" puts `prefix` before it
    (crm_get_account), "opaque" is two unrelated words (cobalt_raven)."""
    head, _, rest = name.partition("_")
    if style == "verb" and head in VERBS:
        return "_".join(x for x in (rng.choice(VERBS[head]), rest) if x)
    if style == "opaque":
        return f"{rng.choice(WORDS)}_{rng.choice(WORDS)}"
    return f"{prefix}_{name}"


def mapping(names: list[str], rng: random.Random, style: str | None = None, taken=()) -> dict[str, str]:
    """A new name for each of `names` in one style (drawn if None), with one namespace prefix where the
    style calls for one: distinct, and none a world's name or one of `taken`."""
    style, prefix = style or rng.choice(STYLES), rng.choice(PREFIXES)
    out, taken = {}, set(world_names()) | set(names) | set(taken)
    for name in names:
        for attempt in range(50):
            new = new_name(name, style if attempt < 25 else "opaque", rng, prefix)
            if new not in taken:
                break
        else:
            raise ValueError(f"no free new name for tool {name!r}")
        out[name] = new
        taken.add(new)
    return out


def _call_id(call_id: str | None, names: dict[str, str]) -> str | None:
    """K2's call id `functions.NAME:INDEX` (read as the call parser reads it) with the name replaced;
    any other id is left alone."""
    m = CALL_ID.fullmatch(call_id or "")
    if m and call_id.startswith("functions.") and m[1] in names:
        return f"functions.{names[m[1]]}:{m[2]}"
    return call_id


def apply(record: dict, names: dict[str, str]) -> dict:
    """A copy of the trajectory `record` (`{"messages", "tools", "meta"}`) with each tool of `names`
    renamed wherever it stands; `meta.renamed` records the map."""
    words = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?!\w)")
    out = copy.deepcopy(record)
    functions = [t["function"] for t in out.get("tools") or []]
    for m in out["messages"]:
        if m["role"] == "assistant":
            for key in ("content", "reasoning_content"):
                if isinstance(m.get(key), str):
                    m[key] = words.sub(lambda x: names[x.group(1)], m[key])
            for call in m.get("tool_calls") or []:
                call["id"] = _call_id(call.get("id"), names)
                functions.append(call["function"])
        elif m["role"] == "tool":
            m["tool_call_id"] = _call_id(m.get("tool_call_id"), names)
            if isinstance(m.get("content"), str) and m["content"].startswith("Error:"):  # the runtime's words
                m["content"] = words.sub(lambda x: names[x.group(1)], m["content"])
            if m.get("name") in names:
                m["name"] = names[m["name"]]
    for f in functions:  # the declaration's and the calls' names
        f["name"] = names.get(f["name"], f["name"])
    out["meta"] = {**out.get("meta", {}), "renamed": names}
    return out


def rename(record: dict, rng: random.Random, style: str | None = None) -> dict:
    """`record` with every declared tool given a new name (`mapping`); a record without tools is
    returned as it is."""
    tools = record.get("tools") or []
    called = {c["function"]["name"] for m in record["messages"] for c in m.get("tool_calls") or []}
    return apply(record, mapping([t["function"]["name"] for t in tools], rng, style, called)) if tools else record


def rename_share(records: list[dict], share: float, seed: int) -> list[dict]:
    """`records` with a share of those that declare tools renamed (each chosen by its own draw, so a
    record's fate depends on its index and `seed` alone)."""
    out = []
    for i, r in enumerate(records):
        rng = random.Random(f"rename:{seed}:{i}")
        out.append(rename(r, rng) if r.get("tools") and rng.random() < share else r)
    return out
