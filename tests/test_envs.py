"""Tool worlds, tasks and rubrics (openk2.envs): every world's tools against its spec, determinism,
failure injection, task generation and splits, the rubric against right and wrong solutions, and the
real agent loop solving tasks with the oracle as a scripted teacher."""

import asyncio
import copy
import math

import jsonschema
import pytest

from openk2.agent.client import ScriptedClient
from openk2.agent.runtime import Agent
from openk2.agent.tools import ToolError
from openk2.envs import (KINDS, SPLITS, Oracle, ScriptedUser, Task, World, answers_of, calls_of, domain_names,
                         generate, make_task, split)
from openk2.envs.expr import evaluate
from openk2.envs.splits import bucket, combo, values

TASKS = generate(90, seed=5)


def test_six_domains_with_valid_schemas():
    assert {"bank", "calendar", "shop", "files", "weather", "units"} <= set(domain_names())
    for d in domain_names():
        tools = World(d).tools()
        assert len(tools) >= 4 and len({t.name for t in tools}) == len(tools)
        for t in tools:
            jsonschema.Draft202012Validator.check_schema(t.parameters)
            assert t.description and t.schema()["function"]["name"] == t.name


def test_same_seed_same_state_and_results():
    for d in domain_names():
        assert World(d, 11).snapshot() == World(d, 11).snapshot()
    assert sum(World(d, 11).snapshot() != World(d, 12).snapshot() for d in domain_names()) >= 5  # units: fixed rows
    task = make_task("bank", "multi_turn", 4)
    runs = [Oracle(task).solve(w := task.world()) + (w.snapshot(),) for _ in range(2)]
    assert runs[0] == runs[1]


def bank():
    w = World("bank", 3)
    return w, sorted(w.state["account"])


def test_get_list_and_bad_arguments():
    w, keys = bank()
    assert w.call("get_account", {"account_id": keys[0]}) == w.state["account"][keys[0]]
    owner = w.state["account"][keys[0]]["owner"]
    items = w.call("list_accounts", {"owner": owner.lower()})["items"]
    assert items and all(r["owner"] == owner for r in items)
    assert {r["account_id"] for r in items} == {k for k, r in w.state["account"].items() if r["owner"] == owner}
    assert w.call("list_accounts", {"offset": 3})["items"] == list(w.state["account"].values())[3:]
    for name, args, text in [("get_account", {"account_id": "ACC-0"}, "no account with account_id 'ACC-0'"),
                             ("get_account", {}, "'account_id' is a required property"),
                             ("get_account", {"account_id": 7}, "7 is not of type 'string'"),
                             ("get_account", {"account_id": keys[0], "x": 1}, "Additional properties"),
                             ("deposit", {"account_id": keys[0], "amount": -5}, "less than or equal to the minimum"),
                             ("fly", {}, "there is no tool 'fly' in bank")]:
        with pytest.raises(ToolError, match=text.replace("(", r"\(")):
            w.call(name, args)
    assert [e["error"] for e in w.log[-6:]] and all("error" in e for e in w.log[-6:])


def test_create_update_delete():
    w, keys = bank()
    new = w.call("open_account", {"owner": "Ada", "currency": "GBP", "type": "savings"})
    assert new["balance"] == 0 and new["account_id"].startswith("ACC-") and new["account_id"] not in keys
    assert w.state["account"][new["account_id"]] == new
    assert w.call("close_account", {"account_id": keys[1]}) == {"deleted": keys[1]}
    assert keys[1] not in w.state["account"]
    with pytest.raises(ToolError, match="no account"):
        w.call("close_account", {"account_id": keys[1]})
    shop = World("shop", 2)
    order = next(iter(shop.state["order"]))
    assert shop.call("cancel_order", {"order_id": order})["status"] == "cancelled"
    with pytest.raises(ToolError, match="no product with sku 'SKU-1'"):  # a reference must exist
        shop.call("place_order", {"sku": "SKU-1", "quantity": 2})
    f = World("files", 2)
    path = next(iter(f.state["file"]))
    with pytest.raises(ToolError, match="already exists"):
        f.call("write_file", {"path": path, "folder": "docs", "owner": "omar", "content": "x"})
    assert f.call("edit_file", {"path": path, "content": "new text"})["content"] == "new text"
    with pytest.raises(ToolError, match="minProperties|should be non-empty|does not have enough properties"):
        f.call("edit_file", {"path": path})


def test_transfer_and_adjust():
    w, keys = bank()
    a, b = (w.state["account"][k]["balance"] for k in keys[:2])
    out = w.call("transfer", {"from_account": keys[0], "to_account": keys[1], "amount": 10.25})
    assert out["from"]["balance"] == round(a - 10.25, 2) and out["to"]["balance"] == round(b + 10.25, 2)
    before = w.snapshot()
    with pytest.raises(ToolError, match="insufficient balance"):
        w.call("transfer", {"from_account": keys[0], "to_account": keys[1], "amount": 10 ** 6})
    with pytest.raises(ToolError, match="are the same account"):
        w.call("transfer", {"from_account": keys[0], "to_account": keys[0], "amount": 1})
    with pytest.raises(ToolError, match="cannot go below|the minimum is 0"):
        w.call("withdraw", {"account_id": keys[2], "amount": 10 ** 6})
    assert w.snapshot() == before  # a refused operation changes nothing
    balance = before["account"][keys[2]]["balance"]
    assert w.call("deposit", {"account_id": keys[2], "amount": 5})["balance"] == round(balance + 5, 2)


def haversine(a, b):  # the reference: the same formula, written out
    p1, p2, dp, dl = map(math.radians, (a["lat"], b["lat"], b["lat"] - a["lat"], b["lon"] - a["lon"]))
    return 2 * 6371 * math.asin(math.sqrt(math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2))


def test_compute():
    u = World("units")
    assert u.call("convert_units", {"value": 1, "from_unit": "mi", "to_unit": "km"}) == {"result": 1.6093}
    assert u.call("convert_units", {"value": 2, "from_unit": "lb", "to_unit": "oz"}) == {"result": 32.0}
    assert u.call("percent_of", {"percent": 15, "value": 80})["result"] == 12
    with pytest.raises(ToolError, match="cannot convert km to kg"):
        u.call("convert_units", {"value": 1, "from_unit": "km", "to_unit": "kg"})
    w = World("weather", 0)
    a, b = list(w.state["city"].values())[:2]
    got = w.call("distance_km", {"a": a["city"], "b": b["city"]})["result"]
    assert got == w.call("distance_km", {"a": b["city"], "b": a["city"]})["result"]
    assert abs(got - haversine(a, b)) <= 0.05
    for bad in ("__import__('os')", "(1).real", "[1][0]", "open('x')"):
        with pytest.raises(ValueError):
            evaluate(bad, {})


def test_failure_injection():
    w0, keys = bank()
    w = World("bank", 3, [{"kind": "transient", "op": "transfer", "times": 1}])
    args = {"from_account": keys[0], "to_account": keys[1], "amount": 1}
    with pytest.raises(ToolError, match="temporarily unavailable.*try again"):
        w.call("transfer", args)
    assert w.snapshot() == w0.snapshot()
    assert w.call("transfer", args)["from"]["balance"] == round(w0.state["account"][keys[0]]["balance"] - 1, 2)
    always = World("bank", 3, [{"kind": "transient", "op": "*", "rate": 1.0}])
    for _ in range(3):
        with pytest.raises(ToolError, match="try again"):
            always.call("get_account", {"account_id": keys[0]})
    p = World("bank", 3, [{"kind": "partial", "op": "list_accounts", "limit": 3}])
    pages, args = [], {}
    while True:
        page = p.call("list_accounts", args)
        pages += page["items"]
        assert len(page["items"]) <= 3
        if "next_offset" not in page:
            break
        args = {"offset": page["next_offset"]}
    assert pages == list(w0.state["account"].values())
    nf = World("bank", 3, [{"kind": "not_found", "op": "get_account", "match": {"account_id": keys[0]}}])
    with pytest.raises(ToolError, match="not found"):
        nf.call("get_account", {"account_id": keys[0]})
    assert nf.call("get_account", {"account_id": keys[1]})["account_id"] == keys[1]
    bad = World("bank", 3, [{"kind": "invalid_argument", "op": "deposit", "message": "deposits are capped at 100"}])
    with pytest.raises(ToolError, match="capped at 100"):
        bad.call("deposit", {"account_id": keys[0], "amount": 500})
    with pytest.raises(ValueError, match="bad failure rule"):
        World("bank", 3, [{"kind": "meteor", "op": "*"}])


def test_tasks_deterministic_and_varied():
    again = generate(90, seed=5)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in TASKS]
    assert [t.id for t in generate(20, seed=6)] != [t.id for t in TASKS[:20]]
    assert {t.kind for t in TASKS} == set(KINDS) and len({t.domain for t in TASKS}) == len(domain_names())
    assert Task.from_dict(TASKS[0].to_dict()).to_dict() == TASKS[0].to_dict()
    assert len({t.turns[0] for t in TASKS}) > 80  # requests vary


def test_each_task_offers_a_sampled_toolset():
    """The plan's tools and 1-2 others (2-3 for no tool), shuffled, a function of the task; the agent
    is given exactly those."""
    for t in TASKS:
        ops, needed = World(t.domain).spec["operations"], {s["tool"] for s in t.plan}
        extra = set(t.tools) - needed
        assert needed <= set(t.tools) <= set(ops) and len(set(t.tools)) == len(t.tools)
        assert 1 + (not needed) <= len(extra) <= 2 + (not needed) or extra == set(ops) - needed
        assert [x.name for x in t.world().tools(t.tools)] == t.tools
    assert len({tuple(t.tools) for t in TASKS}) > 40  # varied, and not always the plan's tools first
    assert any(t.tools[0] not in {s["tool"] for s in t.plan} for t in TASKS if t.plan)


@pytest.mark.parametrize("by", SPLITS)
def test_splits_disjoint(by):
    train, test = split(TASKS, by, seed=1)
    assert test and train and {t.id for t in train}.isdisjoint(t.id for t in test)
    assert len(train) + len(test) == len(TASKS) and split(TASKS, by, seed=1) == (train, test)
    if by == "args":
        held = {v for t in test for v in values(t) if bucket(f"value:{v}", 1) < 0.2}
        assert held and not held & {v for t in train for v in values(t)}
    if by == "combo":
        assert all(len(t.rubric.tools) > 1 for t in test)
        assert not {combo(t) for t in test} & {combo(t) for t in train}
    if by == "domain":
        assert not {t.domain for t in test} & {t.domain for t in train}


def test_a_merged_world_mixes_two_domains_tools_and_stays_in_its_splits():
    """"bank+shop": both domains' records and tools in one world; a parallel task may read one of
    each, the oracle solves it and the rubric passes; the domain split holds out a merged world that
    contains the held-out domain, the combo split a task whose combination is held out."""
    from openk2.envs.spec import load
    from openk2.envs.synth import names
    spec = load("bank+shop")
    assert set(spec["operations"]) == set(load("bank")["operations"]) | set(load("shop")["operations"])
    assert World("bank+shop", 4).snapshot() == World("bank+shop", 4).snapshot()
    assert set(World("bank+shop", 4).state) == {"account", "product", "order"}
    for bad, text in (("bank+bank", "two or more different"), ("bank+nowhere", "no domain 'nowhere'")):
        with pytest.raises(ValueError, match=text):
            load(bad)
    assert names("bank+shop,units", domain_names(), "world", joined=True) == ["bank+shop", "units"]
    with pytest.raises(SystemExit, match="unknown kind"):
        names("single+parallel", list(KINDS), "kind")
    tasks = generate(60, seed=2, domains=["bank+shop", "calendar+units"], kinds=["parallel"])
    mixed = [t for t in tasks if len({s["tool"] for s in t.plan}) == 2
             and len({d for s in t.plan for d in t.domain.split("+") if s["tool"] in load(d)["operations"]}) == 2]
    assert len(mixed) > 10  # a read of each domain in one turn
    for task in mixed[:5]:
        world = task.world()
        calls, answers, _ = Oracle(task).solve(world)
        assert task.rubric.check(world.snapshot(), answers, calls) == (True, []), task.id
    pool = generate(40, seed=3, domains=["bank+weather", "bank+shop"], kinds=["single"])
    train, test = split(pool, "domain", test_domains=["weather"])
    assert {t.domain for t in test} == {"bank+weather"} and {t.domain for t in train} == {"bank+shop"}
    train, test = split(generate(200, seed=2, domains=["bank+shop", "calendar+units"], kinds=["parallel"]), "combo")
    assert test and not {combo(t) for t in test} & {combo(t) for t in train}


def run(task, script):
    """Execute [(turn, name, arguments)] on the task's world: (final state, calls as calls_of gives)."""
    w, calls = task.world(), []
    for turn, name, args in script:
        calls.append({"name": name, "arguments": args, "turn": turn})
        try:
            w.call(name, args)
        except ToolError:
            pass
    return w.snapshot(), calls


def test_rubric_passes_the_plan():
    for task in TASKS:
        world = task.world()
        calls, answers, mentions = Oracle(task).solve(world)
        assert task.rubric.check(world.snapshot(), answers, calls) == (True, []), task.id
        assert mentions == task.rubric.mentions


def test_the_oracle_writes_arguments_in_the_schemas_order():
    """A strict grammar (--strict-tools) writes an object's properties in its schema's order, so the
    teacher does too, whatever order the plan holds them in (and a next page's offset comes last)."""
    reordered = 0
    for task in [*TASKS, *generate(60, seed=1, kinds=["chain"])]:  # chains read filters from a record
        world = task.world()
        schemas = {t.name: list(t.schema()["function"]["parameters"]["properties"]) for t in world.tools()}
        for call in Oracle(task).solve(world)[0]:
            keys = list(call["arguments"])
            assert keys == [k for k in schemas[call["name"]] if k in keys], (task.id, call)
        reordered += any(list(s["arguments"]) != [k for k in schemas[s["tool"]] if k in s["arguments"]]
                         for s in task.plan)
    assert reordered  # some plans hold their arguments in another order


def first(kind, pred=lambda t: True):
    return next(t for t in TASKS if t.kind == kind and pred(t))


def plan_script(task):
    world = task.world()
    calls, answers, _ = Oracle(task).solve(world)
    return [(c["turn"], c["name"], c["arguments"]) for c in calls], answers


def judge(task, script, answers):
    state, calls = run(task, script)
    return task.rubric.check(state, answers, calls)


def test_rubric_rejects_each_kind_of_wrong_solution():
    task = first("single", lambda t: t.rubric.changes)  # a state-changing call
    script, answers = plan_script(task)
    other = next(n for n in World(task.domain).spec["operations"] if n != script[0][1])
    ok, why = judge(task, script + [(9, other, {})], answers)
    assert not ok and any(f"wrong tool: {other}" in r for r in why)
    wrong = [(t, n, {**a, k: v + 1 if isinstance(v, (int, float)) else v + "x"}) for t, n, a in script
             for k, v in list(a.items())[-1:]]
    ok, why = judge(task, wrong, answers)
    assert not ok and any("checkpoint 1: no call" in r and "it was called with" in r for r in why)
    chain = first("chain")
    script, answers = plan_script(chain)
    ok, why = judge(chain, script[:1], answers)
    assert not ok and any("checkpoint 2" in r for r in why) and any("fewer than" in r for r in why)
    read = first("single", lambda t: t.rubric.mentions[0])
    script, answers = plan_script(read)
    assert judge(read, script, answers) == (True, [])
    ok, why = judge(read, script, ["I could not find anything."])
    assert not ok and any("does not mention" in r for r in why)
    ok, why = judge(read, script, None)
    assert not ok and why[-1].startswith("no answer")
    assert not judge(read, [], answers)[0]  # the answer without the call that backs it
    par = first("parallel")
    script, answers = plan_script(par)
    ok, why = judge(par, [(i, n, a) for i, (_, n, a) in enumerate(script)], answers)
    assert not ok and any("in one turn" in r for r in why)
    quiet = first("no_tool")
    answers = Oracle(quiet).solve(quiet.world())[1]
    ok, why = judge(quiet, [(0, next(iter(World(quiet.domain).spec["operations"])), {})], answers)
    assert not ok and any("more than the 0" in r for r in why)


def test_a_missing_record_is_said_not_retried_nor_guessed():
    """`missing`, drawn only when asked for: a request names a record that does not exist; its one call
    fails and the answer says so. Retrying it, acting on another record, or not saying so all fail."""
    assert "missing" not in KINDS and "missing" not in {t.kind for t in TASKS}
    tasks = generate(30, seed=2, kinds=["missing"])
    assert {t.kind for t in tasks} == {"missing"} and len({t.domain for t in tasks}) >= 4
    for task in tasks:
        (step,) = task.plan
        spec = World(task.domain).spec
        entity = spec["operations"][step["tool"]]["entity"]
        key = spec["entities"][entity]["key"]
        fake = step["arguments"][key]
        assert fake not in task.world().state[entity] and task.rubric.mentions == [[fake]]
        script, answers = plan_script(task)
        assert answers[0].startswith("There is no") and fake in answers[0] and len(script) == 1
        assert judge(task, script, answers) == (True, [])
    task = next(t for t in tasks if World(t.domain).spec["operations"][t.plan[0]["tool"]]["kind"] != "get")
    script, answers = plan_script(task)
    ok, why = judge(task, script * 4, answers)
    assert not ok and any("more than the 3" in r for r in why)
    ok, why = judge(task, script, ["Done."])
    assert not ok and any("does not mention" in r for r in why)
    spec = World(task.domain).spec
    entity = spec["operations"][script[0][1]]["entity"]
    real = sorted(task.world().state[entity])[0]
    guess = [(0, script[0][1], {**script[0][2], spec["entities"][entity]["key"]: real})]
    ok, why = judge(task, guess, answers)  # the same request carried out on a record that does exist
    assert not ok and any("checkpoint 1: no call" in r for r in why) and any(real in r for r in why)


def test_a_write_with_nothing_to_report_is_answered_with_the_record_it_acted_on():
    """A write whose op reports nothing is answered with its tool and the record's key (from the call,
    or from a chain's earlier result), never with the tools of the earlier look-up steps."""
    checked = set()
    for task in generate(200, seed=7, domains=["files", "bank", "library"], kinds=["single", "chain"]):
        spec = World(task.domain).spec
        writes = [s for s in task.plan if spec["operations"][s["tool"]]["kind"] not in ("get", "list")]
        if len(task.plan) != len(writes) + (task.kind == "chain") or any(s["report"] for s in task.plan):
            continue
        world = task.world()
        calls, (answer,), _ = Oracle(task).solve(world)
        (write,) = writes
        entity = spec["entities"][spec["operations"][write["tool"]]["entity"]]
        if entity["key"] not in calls[-1]["arguments"]:
            continue  # a write not keyed by its record (a transfer)
        key = calls[-1]["arguments"][entity["key"]]
        assert f"{write['tool']} went through for {entity['mention'].format(key)}" in answer, (task.id, answer)
        assert all(s["tool"] not in answer for s in task.plan if s is not write), answer
        checked.add((task.kind, "$from" in str(write["arguments"])))
    assert {("single", False), ("chain", True)} <= checked  # a key written in the request, and one read

@pytest.mark.parametrize("kind", ["chain", "multi_turn", "recovery", "parallel"])
def test_agent_loop_solves_a_task(kind):
    task = first(kind, lambda t: t.kind != "recovery" or t.failures[0]["kind"] == "transient")
    world = task.world()
    oracle = Oracle(task)
    agent = Agent(ScriptedClient([oracle.reply] * 20), world.tools(), user=ScriptedUser(task))
    ep = asyncio.run(agent.run(task.turns[0]))
    assert ep.stop_reason == "answered"
    assert [m["content"] for m in ep.transcript if m["role"] == "user"] == task.turns
    passed, reasons = task.rubric.check(world.snapshot(), answers_of(ep.transcript), calls_of(ep.transcript))
    assert passed, reasons
    if kind == "recovery":
        assert [e["kind"] for e in ep.tool_errors] == ["tool_error"] and "try again" in ep.tool_errors[0]["message"]
    if kind == "parallel":
        assert len([m for m in ep.transcript if m.get("tool_calls")][0]["tool_calls"]) == 2
    copy.deepcopy(ep.record())  # the record is plain data


def test_numbers_in_an_answer_must_be_the_value_or_it_rounded_to_two_decimals():
    from openk2.envs.rubric import mentioned
    assert mentioned(3283.3871, "The balance is 3,283.39.") and mentioned(40, "40 left")
    assert mentioned(1.6093, "1.61 km") and mentioned(1234.5, "1,234.50")
    for text in ("The balance is 3280.27.", "The balance is 3283.", "3283.4", "ACC-3283.39x"[:4]):
        assert not mentioned(3283.3871, text), text  # 0.1 % off, or fewer than two decimals
    assert not mentioned(40, "New stock: 41.") and not mentioned(1.6093, "1.6 km")
