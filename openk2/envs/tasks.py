"""Tasks with rubrics, generated from the tool worlds, from one call to multi-turn recovery.

Kinds (KINDS): `single` (one call), `parallel` (two independent calls in one turn), `chain` (a list
finds the one record a second call acts on, or a record's reference leads to another record),
`multi_turn` (a scripted follow-up after the first answer), `recovery` (an injected transient error
to retry, or a partial list to page through) and `no_tool`. One more kind is drawn only when asked
for (MORE_KINDS, so the default draws and every held-out set stay as they were): `missing`, a request
that names a record which does not exist; the tool says so, and the answer tells the user, with no
retry and no guess. A task is data: the user's turns
(phrased from the spec's `say` templates), the world (domain, seed, failure rules), the plan the
oracle solves from, and the rubric, built by running that plan on a fresh world. `make_task` is a
function of (domain, kind, seed); `generate` draws many. Splits: splits.py.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

from openk2.envs.oracle import Oracle, fmt
from openk2.envs.rubric import Rubric
from openk2.envs.spec import domain_names, generate as generate_value, load, op_params
from openk2.envs.world import World, changes, initial_state

SUM_ASK = "Quick one, no tools needed: what is {a} + {b}?"  # a no-tool task's sum (sum drills ask it so too)
KINDS = ("single", "parallel", "chain", "multi_turn", "recovery", "no_tool")
MORE_KINDS = ("missing",)  # drawn only when named (generate's `kinds`, synth's --kinds)
PLACEHOLDER = re.compile(r"{(\w+)}")
JOINS = ("{0} {1}", "Two things. {0} {1}", "{0} And one more: {1}")
FOLLOW_UPS = ("Thanks! {0}", "Great. Next: {0}", "One more thing. {0}", "{0}")

# the system prompt of every synthesised and evaluated conversation: training and evaluation match
SYSTEM = ("You are a helpful assistant with tools. Use them to do what the user asks (several at once when "
          "they are independent), retry a call that failed for a passing reason, and answer plainly with the "
          "values you found. When no tool is needed, answer directly.")


@dataclass
class Task:
    id: str
    kind: str
    domain: str
    seed: int  # the world's seed (its initial state)
    turns: list  # the user's first request, then the scripted follow-ups
    plan: list  # steps: {"tool", "arguments", "turn", "group", "report"} (oracle.py)
    failures: list = field(default_factory=list)  # the world's failure rules
    notes: list = field(default_factory=list)  # per turn: values the answer states without a tool
    rubric: Rubric | None = None
    tools: list = field(default_factory=list)  # the toolset offered, in order ([]: every operation)

    def world(self) -> World:
        return World(self.domain, self.seed, self.failures)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(**{**d, "rubric": d.get("rubric") and Rubric(**d["rubric"])})


def say(spec: dict, name: str, template: str, args: dict, text: dict = {}) -> str:  # noqa: B006 — never mutated
    """The template with each argument as a person writes it (`text` overrides some)."""
    params = op_params(spec, name)[0]
    def words(p, v):
        ref = params[p].get("ref")
        return spec["entities"][ref]["mention"].format(fmt(v)) if ref else fmt(v)
    return template.format(**{p: text.get(p) or words(p, v) for p, v in args.items()})


def step(spec: dict, name: str, args: dict, turn: int = 0, group: int = 0, report: list | None = None) -> dict:
    op = spec["operations"][name]
    report = op.get("report", ["result"] if op["kind"] == "compute" else []) if report is None else report
    return {"tool": name, "arguments": args, "turn": turn, "group": group, "report": report}


def sample(spec: dict, state: dict, name: str, rng: random.Random) -> tuple[str, dict]:
    """(template, arguments): a request template of the operation and arguments drawn from the state."""
    op, (params, required) = spec["operations"][name], op_params(spec, name)
    template = rng.choice(op["say"])
    wanted = set(PLACEHOLDER.findall(template))
    if missing := set(required) - wanted:
        raise ValueError(f"domain {spec['name']}: {name}'s template {template!r} lacks {sorted(missing)}")
    if op["kind"] == "list":  # filter by the values of one record, so something matches
        record = rng.choice(list(state[op["entity"]].values()))
        return template, {p: record[p] for p in params if p in wanted}
    args, used = {}, set()
    for p in (p for p in params if p in wanted):
        if ref := params[p].get("ref"):
            args[p] = rng.choice(sorted(set(state[ref]) - used) or sorted(state[ref]))
            used.add(args[p])
        else:
            args[p] = generate_value(params[p], rng, args, state)
    return template, args


def single(spec, state, rng):
    name = rng.choice(sorted(spec["operations"]))
    template, args = sample(spec, state, name, rng)
    return [say(spec, name, template, args)], [step(spec, name, args)], [], []


def parallel(spec, state, rng):
    reads = sorted(n for n, op in spec["operations"].items() if op["kind"] in ("get", "compute"))
    (n1, (t1, a1)), (n2, (t2, a2)) = [(n, sample(spec, state, n, rng)) for n in (rng.choice(reads), rng.choice(reads))]
    if (n1, a1) == (n2, a2):
        return None
    text = rng.choice(JOINS).format(say(spec, n1, t1, a1), say(spec, n2, t2, a2))
    return [text], [step(spec, n1, a1), step(spec, n2, a2)], [], []


def links(spec: dict) -> list[tuple]:
    """Ways one call's result names the record of a second call: ("list", L, B, param) when a list
    can single a record out; ("ref", A, field, B, param) when a record refers to another."""
    ops, out = spec["operations"], []
    for b in sorted(ops):
        for p, f in op_params(spec, b)[0].items():
            if p not in op_params(spec, b)[1] or "ref" not in f:
                continue
            out += [("list", lst, b, p) for lst in sorted(ops)
                    if ops[lst]["kind"] == "list" and ops[lst]["entity"] == f["ref"]]
            out += [("ref", a, g, b, p) for a in sorted(ops) if ops[a]["kind"] == "get" and a != b
                    for g, fa in spec["entities"][ops[a]["entity"]]["fields"].items() if fa.get("ref") == f["ref"]]
    return out


def chain(spec, state, rng):
    if not (candidates := links(spec)):
        return None
    link = rng.choice(candidates)
    b, p = link[-2:]
    template, args = sample(spec, state, b, rng)
    entity = op_params(spec, b)[0][p]["ref"]
    if link[0] == "list":
        lst, key = link[1], spec["entities"][entity]["key"]
        record, fields = rng.choice(list(state[entity].values())), spec["operations"][link[1]].get("filters", [])
        subsets = [[f] for f in rng.sample(fields, len(fields))] + [[f, g] for f in fields for g in fields if f < g]
        unique = [s for s in subsets if sum(all(r[f] == record[f] for f in s) for r in state[entity].values()) == 1]
        if not unique:
            return None
        found = {f: record[f] for f in unique[0]}
        first, path = step(spec, lst, found, report=[]), f"items.0.{key}"
        words = f"the {entity} whose " + " and ".join(f"{f.replace('_', ' ')} is {fmt(v)}" for f, v in found.items())
    else:
        a, path = link[1], link[2]
        a_entity = spec["operations"][a]["entity"]
        x = rng.choice(sorted(state[a_entity]))
        first = step(spec, a, {spec["entities"][a_entity]["key"]: x}, report=[])
        words = f"the {entity} of {spec['entities'][a_entity]['mention'].format(x)}"
    text = say(spec, b, template, args, {p: words})
    return [text], [first, step(spec, b, {**args, p: {"$from": [0, path]}}, group=1)], [], []


def multi_turn(spec, state, rng):
    (t1, p1, _, _), (t2, p2, _, _) = single(spec, state, rng), single(spec, state, rng)
    return [t1[0], rng.choice(FOLLOW_UPS).format(t2[0])], p1 + [{**p2[0], "turn": 1}], [], []


def recovery(spec, state, rng):
    lists = sorted(n for n, op in spec["operations"].items() if op["kind"] == "list")
    if lists and rng.random() < 0.5:
        name = rng.choice(lists)
        template, args = sample(spec, state, name, rng)
        records = state[spec["operations"][name]["entity"]].values()
        matches = sum(all(r[f] == v for f, v in args.items()) for r in records)
        if matches < 2:
            return None
        rule = {"kind": "partial", "op": name, "limit": rng.randint(1, matches - 1)}
        return [say(spec, name, template, args)], [step(spec, name, args)], [rule], []
    turns, plan, _, _ = single(spec, state, rng)
    return turns, plan, [{"kind": "transient", "op": plan[0]["tool"], "times": 1}], []


def no_tool(spec, state, rng):
    form = rng.randrange(3)
    if form == 0:
        name = rng.choice(sorted(spec["operations"]))
        what = spec["operations"][name]["description"]
        text = f'Which of your tools does this: "{what}"? Just name it; don\'t run it.'
        return [text], [], [], [[name]]
    if form == 1:
        key = rng.choice(sorted(state[rng.choice(sorted(state))]))
        return [f"No need to look anything up: please repeat this reference back to me exactly: {key}"], [], [], [[key]]
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return [SUM_ASK.format(a=a, b=b)], [], [], [[a + b]]


def missing(spec, state, rng):
    """A request for a record that does not exist (its key a fresh id of the key's own form): one call,
    whose error the answer passes on (Oracle.answer) instead of a retry."""
    keyed = sorted(n for n, op in spec["operations"].items() if op["kind"] in ("get", "update", "adjust", "delete"))
    if not keyed:
        return None
    name = rng.choice(keyed)
    entity = spec["operations"][name]["entity"]
    key, fields = spec["entities"][entity]["key"], spec["entities"][entity]["fields"]
    if fields[key].get("gen", {}).get("kind") != "id":  # a key made from other fields (a path): no fresh one
        return None
    template, args = sample(spec, state, name, rng)
    if (fake := generate_value(fields[key], rng, {}, state)) in state[entity]:
        return None
    args[key] = fake
    return [say(spec, name, template, args)], [step(spec, name, args, report=[])], [], [[fake]]


BUILDERS = {"single": single, "parallel": parallel, "chain": chain, "multi_turn": multi_turn,
            "recovery": recovery, "no_tool": no_tool, "missing": missing}


def make_task(domain: str, kind: str, seed: int, attempts: int = 40) -> Task:
    """The task of (domain, kind, seed); ValueError when the domain cannot make that kind."""
    spec, rng = load(domain), random.Random(f"{domain}:{kind}:{seed}")
    state = initial_state(spec, seed)
    for _ in range(attempts):
        if (built := BUILDERS[kind](spec, state, rng)) is None:
            continue
        turns, plan, failures, notes = built
        task = Task(f"{spec['name']}-{kind}-{seed}", kind, spec["name"], seed, turns, plan, failures, notes)
        world = task.world()
        try:
            calls, _, mentions = Oracle(task).solve(world)
        except (RuntimeError, KeyError, IndexError):  # a reference the result did not hold
            continue
        retried = [c for c in calls if "try again" in c.get("error", "")]
        errors = [c for c in calls if c.get("error") and c not in retried]
        if (len(errors) != len(calls) if kind == "missing" else errors) or kind == "recovery" and len(calls) < 2:
            continue  # the plan hit a real error (an overdraft, say) or the failure did not show: draw again
        task.rubric = rubric(task, calls, mentions, world)
        task.tools = toolset(spec, plan, random.Random(f"{task.id}:tools"))
        return task
    raise ValueError(f"domain {domain} made no {kind} task in {attempts} attempts (seed {seed})")


def toolset(spec: dict, plan: list, rng: random.Random, distractors: tuple = (1, 2)) -> list[str]:
    """The tools a task offers, as K2's synthesised agents each hold a sampled subset of the tools:
    every tool of the plan and 1-2 others of the domain (2-3 for a task that needs none), shuffled."""
    needed = list(dict.fromkeys(s["tool"] for s in plan))
    others = [name for name in spec["operations"] if name not in needed]
    k = rng.randint(*distractors) + (not needed)
    chosen = needed + rng.sample(others, min(k, len(others)))
    rng.shuffle(chosen)
    return chosen


def rubric(task: Task, calls: list[dict], mentions: list, world: World) -> Rubric:
    """The rubric of a task from the oracle's run: state changes, mentions, checkpoints, call bounds."""
    rounds = {}
    for c in calls:
        if not c.get("error") or task.kind == "missing":  # the call on a missing record is the one to make
            rounds.setdefault(c["turn"], []).append({"name": c["name"], "arguments": c["arguments"]})
    checkpoints = [{"calls": cs, "parallel": len(cs) > 1} for _, cs in sorted(rounds.items())]
    return Rubric(task.domain, task.seed, changes(world, task.seed), mentions, checkpoints, len(calls),
                  len(calls) + 2 if calls else 0)


def generate(n: int, seed: int = 0, domains: list[str] | None = None, kinds: list[str] | None = None) -> list[Task]:
    """n tasks, a function of the arguments: domains and kinds drawn in turn, kinds a domain cannot
    make skipped."""
    rng, tasks, seen = random.Random(f"generate:{seed}"), [], set()
    domains, kinds = list(domains or domain_names()), list(kinds or KINDS)
    failed = set()
    while len(tasks) < n:
        domain, kind, task_seed = rng.choice(domains), rng.choice(kinds), rng.randrange(10**9)
        if (domain, kind) in failed or (domain, kind, task_seed) in seen:
            continue
        seen.add((domain, kind, task_seed))
        try:
            tasks.append(make_task(domain, kind, task_seed))
        except ValueError:
            failed.add((domain, kind))  # e.g. no chain in a domain without a list that singles a record out
            if len(failed) == len(domains) * len(kinds):
                raise
    return tasks
