"""A tool world: the seeded state of one domain spec, its operations as agent `Tool`s, and
controlled failures.

`World(domain, seed, failures)` builds the initial records from the spec's generators (same seed,
same state, same results for the same calls), runs each operation kind once for every domain
(get, list, create, update, delete, transfer, adjust, compute) and logs every call. Failures are
rules, JSON data carried by a task: `{"kind": "transient", "op": "get_account", "times": 1}` (fails,
changes nothing, succeeds on a retry; or `"rate": p`, drawn from the world's own seeded stream),
`{"kind": "partial", "op": "list_accounts", "limit": 2}` (a page of the matches and a `next_offset`),
`{"kind": "not_found" | "invalid_argument", "op": ..., "match": {argument: value}}`. `op` may be "*".
Every failure, and every bad argument, is a `ToolError` whose text tells the model what went wrong.
"""

from __future__ import annotations

import copy
import random

from openk2.agent.tools import ArgumentError, Tool, ToolError
from openk2.envs.expr import evaluate
from openk2.envs.spec import generate, load, op_params, tool_schema

FAILURE_KINDS = ("transient", "partial", "not_found", "invalid_argument")


def initial_state(spec: dict, seed: int) -> dict:
    """{entity: {key: record}} from the spec's rows and generators, a function of (spec, seed) alone."""
    rng, state = random.Random(f"{spec['name']}:{seed}"), {}
    for name, e in spec["entities"].items():
        rows = e.get("rows") or [{} for _ in range(e.get("count", 6))]
        if e.get("rows") and e.get("count", len(rows)) < len(rows):  # a seeded subset, in the file's order
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), e["count"]))]
        state[name] = {}
        for row in rows:
            record = new_record(e, dict(row), rng, state, state[name])
            state[name][record[e["key"]]] = record
    return state


def new_record(e: dict, record: dict, rng: random.Random, state: dict, existing: dict) -> dict:
    """`record` with its missing fields generated in the spec's field order; a fresh, unused key."""
    for fname, f in e["fields"].items():
        if fname not in record:
            record[fname] = generate(f, rng, record, state)
            for _ in range(100 if fname == e["key"] else 0):
                if record[fname] not in existing:
                    break
                record[fname] = generate(f, rng, record, state)
    return {f: record[f] for f in e["fields"]}


def check_rules(failures, operations, where: str) -> None:
    """ValueError for a failure rule of an unknown kind or for an operation `where` lacks."""
    for f in failures:
        if f.get("kind") not in FAILURE_KINDS or not (f.get("op") == "*" or f.get("op") in operations):
            raise ValueError(f"bad failure rule {f}: kind one of {FAILURE_KINDS}, op an operation of {where}")


def inject(failures, name: str, args: dict, n: int, rng: random.Random) -> int | None:
    """The failure rules on the n-th call of `name`: the ToolError of the first that fires, else the
    page size of a matching `partial` rule (None: no rule limits the result)."""
    limit = None
    for f in failures:
        if f["op"] not in ("*", name) or any(args.get(k) != v for k, v in f.get("match", {}).items()):
            continue
        if f["kind"] == "transient" and (n <= f.get("times", 0) or rng.random() < f.get("rate", 0)):
            raise ToolError(f"{name} is temporarily unavailable (503); nothing was changed, try again")
        if f["kind"] == "not_found":
            raise ToolError(f.get("message", f"not found: nothing matches {args}"))
        if f["kind"] == "invalid_argument":
            raise ToolError(f.get("message", f"invalid argument for {name}: {args} is not accepted"))
        limit = f.get("limit", 1) if f["kind"] == "partial" else limit
    return limit


def admit(tool: Tool, failures, counts: dict, rng: random.Random, args: dict) -> int | None:
    """What a call passes before it runs: its arguments against the schema, then the failure rules on
    this n-th call of the tool (a ToolError for either); the page size a `partial` rule sets."""
    try:
        tool.check(args)
    except ArgumentError as e:
        raise ToolError(f"invalid arguments for {tool.name}: {e}") from None
    counts[tool.name] = n = counts.get(tool.name, 0) + 1
    return inject(failures, tool.name, args, n, rng)


def partial_page(name: str, items: list, next_offset: int) -> dict:
    """A list tool's page when more items follow: the page, where the rest starts, and a note saying how
    to get it (worlds with a `partial` failure rule; the list drills)."""
    return {"items": items, "next_offset": next_offset,
            "note": f"partial results: call {name} again with offset={next_offset} for the rest"}


class World:
    def __init__(self, domain: str | dict, seed: int = 0, failures: list[dict] = ()):
        self.spec = load(domain) if isinstance(domain, str) else domain
        self.name, self.seed = self.spec["name"], seed
        self.state = initial_state(self.spec, seed)
        self.rng = random.Random(f"{self.name}:{seed}:calls")  # new keys, failure rates
        check_rules(failures, self.spec["operations"], self.name)
        self.failures, self.counts, self.log, self._tools = [dict(f) for f in failures], {}, [], {}

    def snapshot(self) -> dict:
        return copy.deepcopy(self.state)

    def tools(self, names: list[str] | None = None) -> list[Tool]:
        """The tools of `names` (a task's toolset, in its order), or of every operation."""
        return [self.tool(name) for name in names or self.spec["operations"]]

    def tool(self, name: str) -> Tool:  # one per world and operation, so its schema validator is built once
        async def run(arguments: dict, context=None):
            return self.call(name, arguments)

        return self._tools.setdefault(name, Tool(name, self.spec["operations"][name]["description"],
                                                 tool_schema(self.spec, name), run))

    def call(self, name: str, arguments: dict) -> dict:
        """Run one operation; ToolError (logged too) for an unknown tool, bad arguments or a failure."""
        entry = {"name": name, "arguments": copy.deepcopy(arguments)}
        self.log.append(entry)
        try:
            entry["result"] = self._call(name, arguments)
            return copy.deepcopy(entry["result"])
        except ToolError as e:
            entry["error"] = str(e)
            raise

    def _call(self, name: str, args: dict) -> dict:
        op = self.spec["operations"].get(name)
        if op is None:
            raise ToolError(f"there is no tool {name!r} in {self.name}; "
                            f"the tools are: {', '.join(self.spec['operations'])}")
        limit = admit(self.tool(name), self.failures, self.counts, self.rng, args)
        result = getattr(self, "_" + op["kind"])(op, name, args)
        if limit is not None and op["kind"] == "list" and len(result["items"]) > limit:
            result = partial_page(name, result["items"][:limit], args.get("offset", 0) + limit)
        return result

    # ---------------------------------------------------------------- the operation kinds

    def record(self, entity: str, key) -> dict:
        records = self.state[entity]
        if key not in records:
            e = self.spec["entities"][entity]
            raise ToolError(f"no {entity} with {e['key']} {key!r} (there are {len(records)} {entity} records)")
        return records[key]

    def _show(self, op: dict, record: dict) -> dict:
        return {k: record[k] for k in op.get("show") or record}

    def _check_refs(self, name: str, args: dict) -> None:
        for n, f in op_params(self.spec, name)[0].items():
            if "ref" in f and n in args:
                self.record(f["ref"], args[n])

    def _get(self, op, name, args):
        return self._show(op, self.record(op["entity"], args[self.key(op)]))

    def _list(self, op, name, args):
        def same(a, b):
            return a.casefold() == b.casefold() if isinstance(a, str) and isinstance(b, str) else a == b

        found = [r for r in self.state[op["entity"]].values()
                 if all(same(r[f], args[f]) for f in op.get("filters", []) if f in args)]
        items = [self._show(op, r) for r in found[args.get("offset", 0):]]
        return {"items": items, "count": len(items)}

    def _create(self, op, name, args):
        e, records, key = self.spec["entities"][op["entity"]], self.state[op["entity"]], self.key(op)
        self._check_refs(name, args)
        if key in args and args[key] in records:
            raise ToolError(f"{op['entity']} {args[key]!r} already exists")
        record = new_record(e, {**op.get("set", {}), **args}, self.rng, self.state, records)
        records[record[key]] = record
        return dict(record)

    def _update(self, op, name, args):
        record = self.record(op["entity"], args[self.key(op)])
        self._check_refs(name, args)
        record.update({k: v for k, v in args.items() if k != self.key(op)}, **op.get("set", {}))
        return self._show(op, record)

    def _delete(self, op, name, args):
        self.record(op["entity"], key := args[self.key(op)])
        del self.state[op["entity"]][key]
        return {"deleted": key}

    def _adjust(self, op, name, args):
        record = self.record(op["entity"], args[self.key(op)])
        value = round(record[op["field"]] + op.get("sign", 1) * args["amount"], op.get("decimals", 2))
        if "min" in op and value < op["min"]:
            raise ToolError(f"insufficient {op['field']}: {args[self.key(op)]} has {record[op['field']]}, "
                            f"{name} of {args['amount']} would leave {value} (the minimum is {op['min']})")
        record[op["field"]] = value
        return self._show(op, record)

    def _transfer(self, op, name, args):
        field, amount = op["field"], args["amount"]
        if args[op["from"]] == args[op["to"]]:
            raise ToolError(f"{op['from']} and {op['to']} are the same {op['entity']}")
        src, dst = self.record(op["entity"], args[op["from"]]), self.record(op["entity"], args[op["to"]])
        if src[field] < amount:
            raise ToolError(f"insufficient {field}: {args[op['from']]} has {src[field]}, the transfer needs {amount}")
        digits = op.get("decimals", 2)
        src[field], dst[field] = round(src[field] - amount, digits), round(dst[field] + amount, digits)
        return {"from": self._show(op, src), "to": self._show(op, dst)}

    def _compute(self, op, name, args):
        names = dict(args)
        for n, f in op["params"].items():
            if "ref" in f:
                names[n] = self.record(f["ref"], args[n])
        for test, message in op.get("checks", []):
            if not evaluate(test, names):
                raise ToolError(message.format(**args))
        try:
            value = evaluate(op["expr"], names)
        except (ZeroDivisionError, ValueError, OverflowError) as e:
            raise ToolError(f"{name} cannot compute this: {e}") from None
        return {"result": round(value, op.get("digits", 4))}

    def key(self, op: dict) -> str:
        return self.spec["entities"][op["entity"]]["key"]


def changes(world: World, seed: int) -> dict:
    """{entity: {key: record, or None when deleted}}: what was done to `world` since its seed's state."""
    start, out = initial_state(world.spec, seed), {}
    for entity, records in world.state.items():
        diff = {k: r for k, r in records.items() if start[entity].get(k) != r}
        diff.update({k: None for k in start[entity] if k not in records})
        if diff:
            out[entity] = diff
    return out
