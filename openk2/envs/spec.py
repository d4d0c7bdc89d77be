"""Declarative domain specs: a JSON file per domain (openk2/envs/domains/), read and checked here.

A spec names its entities (a key field, typed fields, a generator per field, optional fixed `rows`,
`count` records, and `mention`: how the request text names one, e.g. "account {}") and its operations,
each of one generic `kind` that world.py implements once: get, list, create, update, delete,
transfer, adjust, compute. `op_params` turns an operation into its parameters (JSON-schema fields,
with `ref` naming the entity a key or reference points to); `generate` makes a field's seeded value.
A new domain is a new file here; nothing in Python names a domain. "a+b" names the world of two
domains at once (`merge`).
"""

from __future__ import annotations

import datetime
import json
import random
from functools import cache
from importlib import resources
from pathlib import Path

from openk2.envs.expr import parse

KINDS = ("get", "list", "create", "update", "delete", "transfer", "adjust", "compute")
READS = ("get", "list", "compute")  # kinds that change nothing
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
OFFSET = {"type": "integer", "minimum": 0, "description": "skip this many matches (to read the next page)"}


def domain_names() -> list[str]:
    """The shipped domains, by file name."""
    folder = resources.files("openk2.envs") / "domains"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def parts(world: str) -> list[str]:
    """The domains of a world's name: "bank+shop" (a merged world) -> ["bank", "shop"]."""
    return world.split("+")


@cache
def load(name: str) -> dict:
    """A shipped domain by name, or a spec file by path; checked (ValueError names what is wrong).
    "bank+shop" is one world of both domains' records and tools (`merge`)."""
    if "+" in name and not name.endswith(".json"):
        return merge([load(part) for part in parts(name)])
    path = Path(name) if name.endswith(".json") else resources.files("openk2.envs") / "domains" / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no domain {name!r}; the domains are: {', '.join(domain_names())}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    check(spec)
    return spec


def merge(specs: list[dict]) -> dict:
    """One spec of several domains: their entities and operations side by side (a name two of them
    use is an error), so a task may ask for tools of both, as a real agent's toolset mixes services."""
    names = [s["name"] for s in specs]
    if len(set(names)) < len(names) or len(names) < 2:
        raise ValueError(f"a merged world needs two or more different domains, not {'+'.join(names)}")
    merged = {"name": "+".join(names), "description": "; ".join(s["description"] for s in specs),
              "entities": {}, "operations": {}}
    for s in specs:
        for part in ("entities", "operations"):
            if twice := set(merged[part]) & set(s[part]):
                raise ValueError(f"domains {'+'.join(names)} both define {part} {sorted(twice)}")
            merged[part].update(s[part])
    check(merged)
    return merged


def check(spec: dict) -> None:
    name, entities = spec.get("name", "?"), spec.get("entities") or {}
    for ename, e in entities.items():
        if e.get("key") not in e.get("fields", {}):
            raise ValueError(f"domain {name}: entity {ename} has no key field {e.get('key')!r} in its fields")
        for fname, f in e["fields"].items():
            if f.get("type") not in TYPES:
                raise ValueError(f"domain {name}: {ename}.{fname} has type {f.get('type')!r}, not one of {list(TYPES)}")
    for oname, op in (spec.get("operations") or {}).items():
        if op.get("kind") not in KINDS:
            raise ValueError(f"domain {name}: operation {oname} has kind {op.get('kind')!r}, not one of {KINDS}")
        if op["kind"] != "compute" and op.get("entity") not in entities:
            raise ValueError(f"domain {name}: operation {oname} names no known entity ({op.get('entity')!r})")
        fields = entities.get(op.get("entity"), {}).get("fields", {})
        for f in [*op.get("filters", []), *op.get("fields", []), *op.get("report", []),
                  *op.get("show", []), *([op["field"]] if "field" in op else [])]:
            if op["kind"] != "compute" and f not in fields:
                raise ValueError(f"domain {name}: operation {oname} names no field {f!r} of {op['entity']}")
        for text in [op.get("expr", "0"), *(c[0] for c in op.get("checks", []))]:
            parse(text)
        if not op.get("say"):
            raise ValueError(f"domain {name}: operation {oname} has no `say` templates for requests")


def field_schema(f: dict) -> dict:
    """The JSON schema of one field (the spec's extra keys, gen and ref, left out)."""
    return {k: v for k, v in f.items() if k in ("type", "description", "enum", "minimum", "maximum",
                                                "exclusiveMinimum")}


def op_params(spec: dict, name: str) -> tuple[dict, list[str]]:
    """(parameters by name, required names) of an operation; a parameter that names a record has `ref`."""
    op = spec["operations"][name]
    e = spec["entities"].get(op.get("entity"), {})
    fields, key, kind = e.get("fields", {}), e.get("key"), op["kind"]
    keyed = {key: {**fields.get(key, {}), "ref": op.get("entity")}}
    amount = {"type": "number", "exclusiveMinimum": 0, "description": f"how much {op.get('field', '')}",
              **op.get("amount", {})}
    ref = {n: fields[n] for n in op.get("fields", [])}  # a field with `ref` names a record of that entity
    if kind in ("get", "delete"):
        return keyed, [key]
    if kind == "list":
        return {**{n: fields[n] for n in op.get("filters", [])}, "offset": OFFSET}, []
    if kind == "create":
        return ref, list(ref)
    if kind == "update":
        return {**keyed, **ref}, [key]
    if kind == "adjust":
        return {**keyed, "amount": amount}, [key, "amount"]
    if kind == "transfer":
        side = {**fields[key], "ref": op["entity"]}
        params = {op["from"]: {**side, "description": f"the {op['entity']} to take from"},
                  op["to"]: {**side, "description": f"the {op['entity']} to give to"}, "amount": amount}
        return params, list(params)
    return op["params"], list(op["params"])  # compute


def tool_schema(spec: dict, name: str) -> dict:
    """The operation's parameters as a JSON schema object (strict: no unknown arguments)."""
    params, required = op_params(spec, name)
    schema = {"type": "object", "properties": {n: field_schema(f) for n, f in params.items()},
              "required": required, "additionalProperties": False}
    if spec["operations"][name]["kind"] == "update" and spec["operations"][name].get("fields"):
        schema["minProperties"] = 2  # the key and at least one field to change
    return schema


def generate(f: dict, rng: random.Random, record: dict, state: dict):
    """A seeded value for field `f` of a record being built (earlier fields in `record`; other
    entities' records in `state`)."""
    g = f.get("gen") or ({"kind": "choice", "values": f["enum"]} if "enum" in f else {"kind": f["type"]})
    kind = g["kind"]
    if kind == "id":
        return f"{g.get('prefix', '')}{rng.randrange(10 ** (g.get('digits', 4) - 1), 10 ** g.get('digits', 4))}"
    if kind == "choice":
        return rng.choice(g["values"])
    if kind in ("int", "integer"):
        return rng.randint(g.get("min", 0), g.get("max", 100))
    if kind in ("float", "number"):
        return round(rng.uniform(g.get("min", 0), g.get("max", 100)), g.get("decimals", 2))
    if kind == "date":
        start = datetime.date.fromisoformat(g.get("start", "2025-06-02"))
        return (start + datetime.timedelta(days=rng.randrange(g.get("days", 14)))).isoformat()
    if kind == "pattern":
        picks = {k: rng.choice(v) for k, v in g.get("choices", {}).items()}
        return g["pattern"].format(**record, **picks)
    if kind == "words":
        lo, hi = g.get("n", [3, 6])
        return " ".join(rng.choice(g["values"]) for _ in range(rng.randint(lo, hi)))
    if kind == "ref":
        return rng.choice(sorted(state[f["ref"]]))
    if kind == "boolean":
        return rng.random() < 0.5
    raise ValueError(f"unknown generator kind {kind!r}")
