"""Trajectory synthesis: the oracle teacher passes the judge on every world and task kind, the judge
rejects corrupted trajectories for the right reason, the output is SFT data (read, masked and
rendered by our own reader), runs are deterministic per seed, the LLM teacher and LLM judge work
against a scripted OpenAI-compatible endpoint and the teacher against our own server, and
`openk2 synth` runs end to end."""

import asyncio
import json
import random
import re
from collections import Counter
from types import SimpleNamespace

import jsonschema
import pytest

from openk2.agent.client import ScriptedClient
from openk2.cli import main as cli
from openk2.envs import KINDS, World, domain_names, make_task, split
from openk2.envs.drills import drills, list_drills, sum_drills, tool_drills
from openk2.envs.judge import LLMJudge, category, corrected_turns, parse_verdict
from openk2.envs.oracle import Oracle
from openk2.envs.synth import pick_tasks, programmatic_client, summary, synthesize, trajectory
from openk2.envs.spec import load, op_params
from openk2.envs.rubric import calls_of
from openk2.envs.tasks import SYSTEM, generate
from openk2.envs.teacher import FIXES, FIXES_AGAIN, SLIPS, Teacher, held_out_with, say_calls, worked_sum
from openk2.tokenizer import Tokenizer
from openk2.tokenizer.sft import encode_with_mask, read_jsonl

TOK = Tokenizer.byte_level()  # byte-level, K2's special tokens above 255


def one_per_kind_and_world():
    out = []
    for domain in domain_names():
        for kind in KINDS:
            try:
                out.append(make_task(domain, kind, 7))
            except ValueError:  # a kind this domain cannot make (checked below: at most a few)
                pass
    return out


TASKS = one_per_kind_and_world()


def run(coro):
    return asyncio.run(coro)


def test_the_oracle_teacher_passes_the_judge_for_every_kind_and_world():
    assert len(TASKS) >= len(domain_names()) * len(KINDS) - 3 and {t.kind for t in TASKS} == set(KINDS)
    records = synthesize(TASKS, seed=0)
    for task, r in zip(TASKS, records, strict=True):
        m = r["meta"]
        assert (m["task"], m["passed"], m["reasons"], m["stop_reason"]) == (task.id, True, [], "answered")
        assert [x["content"] for x in r["messages"] if x["role"] == "user"] == task.turns
        offered = [t["function"]["name"] for t in r["tools"]]  # the task's sampled toolset, in its order
        assert offered == task.tools and {s["tool"] for s in task.plan} <= set(offered)
        assert set(offered) <= set(World(task.domain).spec["operations"]) and len(offered) >= 2
        errors = [x["content"] for x in r["messages"] if x["role"] == "tool" and x["content"].startswith("Error")]
        if task.kind == "recovery" and task.failures[0]["kind"] == "transient":
            assert len(errors) == 1 and "try again" in errors[0]
        else:
            assert not errors
    calling = [x for r in records for x in r["messages"] if x.get("tool_calls")]
    for x in calling:  # each calling turn says its calls' values in words, after a varied thought
        assert x["content"].endswith(say_calls(x["tool_calls"]))
    thoughts = {x["content"][: -len(say_calls(x["tool_calls"]))] for x in calling}
    answers = {x["content"].split(" ")[0] for r in records for x in r["messages"]
               if x["role"] == "assistant" and not x.get("tool_calls")}
    assert len(thoughts) >= 4 and "" in thoughts and len(answers) >= 8  # natural-language variety
    last = summary(records).splitlines()[-1].split()
    assert last[:4] == ["all", str(len(TASKS)), str(len(TASKS)), "0"]


def test_missing_records_the_teacher_says_so_and_the_judge_keeps_it():
    tasks = generate(12, seed=3, kinds=["missing"])
    for task, r in zip(tasks, synthesize(tasks, seed=0), strict=True):
        assert r["meta"]["passed"], r["meta"]["reasons"]
        results = [x["content"] for x in r["messages"] if x["role"] == "tool"]
        assert len(results) == 1 and results[0].startswith("Error: no ")
        fake = task.rubric.mentions[0][0]
        assert "There is no" in r["messages"][-1]["content"] and fake in r["messages"][-1]["content"]


def test_say_calls_puts_each_value_in_words_as_the_arguments_hold_it():
    def call(name, args):
        return {"function": {"name": name, "arguments": json.dumps(args)}}
    assert say_calls([call("transfer", {"from_account": "ACC-1", "amount": 20.5, "note": "rent"}),
                      call("list_accounts", {})]) == \
        "Calling transfer with from_account ACC-1, amount 20.5, note rent; list_accounts."
    assert say_calls([call("f", {"ok": True, "tags": ["a", "b"], "n": 3})]) == \
        'Calling f with ok true, tags ["a", "b"], n 3.'


def corrupt(task, how):
    """A ScriptedClient teacher that goes wrong in one way."""
    teacher, ops = Teacher(task), list(World(task.domain).spec["operations"])

    def reply(messages, tools):
        out = teacher.reply(messages, tools)
        if how == "format" and messages[-1]["role"] == "user":  # a call with a malformed id: the parser drops it
            c = out["tool_calls"][0]["function"]
            return ("<|tool_calls_section_begin|><|tool_call_begin|>functions." + c["name"] + ":x"
                    "<|tool_call_argument_begin|>" + c["arguments"] + "<|tool_call_end|><|tool_calls_section_end|>")
        for c in out.get("tool_calls", []):
            f = c["function"]
            if how == "tool":
                f["name"] = next(o for o in ops if o != f["name"])
            if how == "args":
                args = json.loads(f["arguments"])
                k = sorted(args)[-1]
                args[k] = args[k] + 1 if isinstance(args[k], (int, float)) else args[k] + "x"
                f["arguments"] = json.dumps(args)
        if how == "answer" and "content" in out and not out.get("tool_calls"):
            out["content"] = "Sorry, I could not find that."
        return out

    return ScriptedClient([reply] * 16, name="corrupt")


@pytest.mark.parametrize("how, expected", [("tool", "wrong_tool"), ("args", "wrong_args"),
                                           ("answer", "wrong_answer"), ("loop", "stopped"),
                                           ("format", "bad_format")])
def test_the_judge_rejects_corrupted_trajectories_for_the_right_reason(how, expected):
    task = next(t for t in TASKS if t.kind == "single" and t.rubric.mentions[0] and t.rubric.max_calls)
    if how == "loop":  # calls forever: the budget stops it
        call = {"id": "functions.x:0", "type": "function",
                "function": {"name": task.plan[0]["tool"], "arguments": json.dumps(task.plan[0]["arguments"])}}
        client = ScriptedClient([{"tool_calls": [call]}] * 40, name="loop")
    else:
        client = corrupt(task, how)
    r = run(trajectory(task, client, seed=0))
    assert not r["meta"]["passed"] and expected in r["meta"]["rejected_by"], r["meta"]["reasons"]
    assert all(category(x) in r["meta"]["rejected_by"] for x in r["meta"]["reasons"])


def test_output_is_sft_data_that_renders_with_the_chat_template(tmp_path, capsys):
    out = tmp_path / "agentic.jsonl"
    cli(["synth", "--n", "12", "--seed", "3", "--out", str(out), "--worlds", "bank,shop,units"])
    table = capsys.readouterr().out
    assert "all                 12      12         0" in table and f"wrote 12 trajectories to {out}" in table
    rows = read_jsonl(out)  # the SFT reader: messages + tools; the meta field is ignored
    metas = [json.loads(line)["meta"] for line in out.read_text().splitlines()]
    assert len(rows) == 12 and {m["domain"] for m in metas} <= {"bank", "shop", "units"}
    for (_, messages, tools), meta in zip(rows, metas):
        ids, mask = encode_with_mask(TOK, messages, tools)
        text = TOK.decode(ids)
        assert text.count("<|im_system|>tool_declare<|im_middle|>") == 1  # tools declared as K2 does
        learned = TOK.decode([i for i, m in zip(ids, mask) if m])
        for m in messages:
            if m["role"] == "assistant":
                assert (m.get("content") or "") in learned
                for c in m.get("tool_calls") or []:
                    assert f"<|tool_call_begin|>{c['id']}<|tool_call_argument_begin|>{c['function']['arguments']}" \
                        in learned
            elif m["role"] in ("user", "tool"):
                assert m["content"] not in learned and m["content"] in text
        assert learned.count("<|im_end|>") == sum(m["role"] == "assistant" for m in messages)


def test_copy_drills_quote_the_requests_values_exactly_and_come_with_synth_on_request(tmp_path, capsys):
    some = drills(300, seed=5)
    assert json.dumps(some) == json.dumps(drills(300, seed=5)) and some != drills(300, seed=6)
    forms = Counter()
    for d in some:
        user, answer = (m["content"] for m in d["messages"])
        assert [m["role"] for m in d["messages"]] == ["user", "assistant"] and d["meta"]["kind"] == "drill"
        if answer.startswith("{"):  # a JSON object of some of the stated values, each with its JSON type
            values = json.loads(answer)
            forms["json"] += 1
        else:
            key, value = answer.removeprefix("The ").removesuffix(".").split(" is ", 1)
            values = {key: value}
            forms["prose"] += 1
        said = user.removeprefix("Write as JSON: ").rsplit(".", 1)[0] if user.startswith("Write") else \
            user.rsplit(". ", 1)[0]
        stated = dict(pair.split(" ", 1) for pair in said.split(", "))  # "key value, key value"
        for k, v in values.items():
            assert stated[k] == str(v) and (isinstance(v, str) or json.loads(stated[k]) == v), (user, answer)
        assert ids_of(answer) <= ids_of(user)
    assert forms["json"] > 100 and forms["prose"] > 50
    out = tmp_path / "mix.jsonl"
    cli(["synth", "--n", "4", "--seed", "3", "--out", str(out), "--worlds", "units", "--drills", "5"])
    assert f"wrote 4 trajectories and 5 copy drills to {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[4:] == drills(5, seed=3) and all(r["tools"] for r in rows[:4])
    assert [len(messages) for _, messages, tools in read_jsonl(out)][4:] == [2] * 5  # SFT reads them, no tools
    with pytest.raises(SystemExit, match="--drills, --tool-drills, --list-drills and --sum-drills at least 0"):
        cli(["synth", "--n", "4", "--out", str(out), "--drills", "-1"])


def test_tool_drills_pick_the_tool_the_request_names_and_copy_its_values(tmp_path, capsys):
    """Each tool drill declares made-up tools that share words; for each call, exactly one declared tool
    has both of the words its sentence of the request uses, the call's arguments are valid for its schema and each is in
    the request as written, the results answer the calls, and the answer quotes the results."""
    some = tool_drills(400, seed=5)
    assert json.dumps(some) == json.dumps(tool_drills(400, seed=5)) and some != tool_drills(400, seed=6)
    shipped = {name for d in domain_names() for name in load(d)["operations"]}
    weather = set(json.dumps(load("weather")).lower().replace('"', " ").split()) & {"city", "weather", "km"}
    assert weather  # the check below means something
    calls_per_drill = Counter()
    for d in some:
        roles = [m["role"] for m in d["messages"]]
        n = len(d["messages"][2]["tool_calls"])
        calls_per_drill[n] += 1
        assert roles == ["system", "user", "assistant"] + ["tool"] * n + ["assistant"]
        assert d["meta"]["kind"] == "tool_drill"
        assert d["messages"][0]["content"] == SYSTEM and 2 <= len(d["tools"]) <= 5
        user, calling = d["messages"][1]["content"], d["messages"][2]
        declared = {t["function"]["name"]: t["function"] for t in d["tools"]}
        assert not set(declared) & shipped and not weather & set(json.dumps(d).lower().replace('"', " ").split())
        asks = re.split(r"(?<=[.?])\s+", user)  # one sentence per call
        assert len(asks) == n
        for ask, call in zip(asks, calling["tool_calls"]):
            named = [name for name in declared if all(re.search(rf"\b{w}\b", ask, re.I) for w in name.split("_"))]
            assert named == [call["function"]["name"]], (ask, named)
        assert calling["content"].endswith(say_calls(calling["tool_calls"]))
        for call, result in zip(calling["tool_calls"], d["messages"][3:3 + n]):
            args = json.loads(call["function"]["arguments"])
            jsonschema.validate(args, declared[call["function"]["name"]]["parameters"])
            assert all(str(v) in user for v in args.values()), (user, args)
            assert result["tool_call_id"] == call["id"] and result["name"] == call["function"]["name"]
            for key, value in list(json.loads(result["content"]).items())[1:]:
                assert f"{key}: {value}" in d["messages"][-1]["content"]
    assert calls_per_drill[1] > 200 and calls_per_drill[2] > 50
    out = tmp_path / "mix.jsonl"
    cli(["synth", "--n", "2", "--seed", "3", "--out", str(out), "--worlds", "units", "--drills", "2",
         "--tool-drills", "3"])
    assert f"wrote 2 trajectories and 2 copy drills and 3 tool drills to {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[2:4] == drills(2, seed=3) and rows[4:] == tool_drills(3, seed=3)
    assert all(tools for _, _, tools in list(read_jsonl(out))[4:])  # SFT reads them with their tools
    with pytest.raises(SystemExit, match="--list-drills and --sum-drills at least 0"):
        cli(["synth", "--n", "4", "--out", str(out), "--tool-drills", "-1"])


def test_list_drills_page_as_a_world_does_and_quote_every_item_once_in_order(tmp_path, capsys):
    """A list drill calls its one made-up list tool with valid arguments, page after page at the offsets the
    results name (as a world's partial results do), and its answer names the items of all pages, in order,
    each once, with their count; ids look alike (one shape, one prefix) but are distinct."""
    some = list_drills(300, seed=5)
    assert json.dumps(some) == json.dumps(list_drills(300, seed=5)) and some != list_drills(300, seed=6)
    shipped = {name for d in domain_names() for name in load(d)["operations"]}
    pages = Counter()
    for d in some:
        msgs, (tool,) = d["messages"], d["tools"]
        name, schema = tool["function"]["name"], tool["function"]["parameters"]
        assert name not in shipped and d["meta"]["kind"] == "list_drill" and msgs[0]["content"] == SYSTEM
        calls, results = msgs[2:-1:2], msgs[3:-1:2]
        assert [m["role"] for m in msgs] == ["system", "user"] + ["assistant", "tool"] * len(calls) + ["assistant"]
        items, offset = [], 0
        for call, result in zip(calls, results):
            (tc,) = call["tool_calls"]
            args = json.loads(tc["function"]["arguments"])
            jsonschema.validate(args, schema)
            assert args.get("offset", 0) == offset and args["owner"] in msgs[1]["content"]
            assert call["content"].endswith(say_calls(call["tool_calls"])) and result["tool_call_id"] == tc["id"]
            page = json.loads(result["content"])
            items += page["items"]
            if result is results[-1]:  # the rest, counted, as a world's last page
                assert page == {"items": page["items"], "count": len(page["items"])}
            else:
                offset += len(page["items"])
                assert page == {"items": page["items"], "next_offset": offset,
                                "note": f"partial results: call {name} again with offset={offset} for the rest"}
        ids = [next(iter(item.values())) for item in items]
        assert len(set(ids)) == len(ids) and len({i.split("-")[0] for i in ids}) == 1 and 2 <= len(ids) <= 7
        assert f"{len(ids)} found: {', '.join(ids)}." in msgs[-1]["content"]
        pages[len(calls) > 1] += 1
    assert pages[True] > 60 and pages[False] > 120
    out = tmp_path / "mix.jsonl"
    cli(["synth", "--n", "2", "--seed", "3", "--out", str(out), "--worlds", "units", "--list-drills", "3"])
    assert f"wrote 2 trajectories and 3 list drills to {out}" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[2:] == list_drills(3, seed=3)
    assert all(tools for _, _, tools in list(read_jsonl(out))[2:])  # SFT reads them with their tools


STEP = re.compile(r"(\d) \+ (\d)(?: \+ (1))? = (\d+)(, carry 1)?")


def test_a_worked_sum_adds_digit_by_digit_and_ends_with_the_sum():
    for a in range(0, 131):
        for b in (*range(0, 13), *range(37, 131, 9)):
            text = worked_sum(a, b)
            head, _, rest = text.partition(": ")
            work, _, last = rest.partition(" So ")
            assert head == f"{a} + {b}" and last == f"{a} + {b} = {a + b}.", text
            steps = [STEP.fullmatch(s).groups() for s in work.rstrip(".").split("; ")]
            x, y = (str(v)[::-1].ljust(len(steps), "0") for v in (a, b))
            assert len(steps) == max(len(str(a)), len(str(b))), text
            carry = 0
            for i, (p, q, c, total, carried) in enumerate(steps):  # the i-th digits, plus the carry in
                assert (int(p), int(q), int(c or 0)) == (int(x[i]), int(y[i]), carry), text
                assert int(total) == int(p) + int(q) + carry, text
                carry = int(total) // 10 if i < len(steps) - 1 else 0
                assert bool(carried) == bool(carry), text


def test_the_teacher_works_a_sum_out_and_sum_drills_ask_it_the_same_way(tmp_path, capsys):
    sums = [t for t in (make_task("bank", "no_tool", s) for s in range(40)) if " + " in t.turns[0]]
    assert len(sums) >= 5
    for r, task in zip(synthesize(sums, seed=0), sums, strict=True):
        a, b = map(int, re.search(r"(\d+) \+ (\d+)", task.turns[0]).groups())
        assert task.rubric.mentions == [[a + b]] and r["meta"]["passed"]  # the rubric asks for the sum only
        assert r["messages"][-1] == {"role": "assistant", "content": worked_sum(a, b)}
    answers = [Oracle(t).act(0, [])[0] for t in sums]
    assert all(not re.search(r"carry|So ", text) for text in answers)  # the oracle itself states only the sum
    some = sum_drills(500, seed=5)
    assert json.dumps(some) == json.dumps(sum_drills(500, seed=5)) and some != sum_drills(500, seed=6)
    systems = 0
    for d in some:
        *head, user, answer = d["messages"]
        systems += head == [{"role": "system", "content": SYSTEM}]
        a, b = map(int, re.search(r"(\d+) \+ (\d+)\?", user["content"]).groups())
        assert user["role"] == "user" and answer == {"role": "assistant", "content": worked_sum(a, b)}
        assert 0 <= min(a, b) and max(a, b) <= 99 and d["meta"]["kind"] == "sum_drill"
    assert 150 < systems < 350 and len({d["messages"][-2]["content"] for d in some}) > 450
    out = tmp_path / "sums.jsonl"
    cli(["synth", "--n", "2", "--seed", "3", "--out", str(out), "--worlds", "units", "--sum-drills", "4"])
    assert f"wrote 2 trajectories and 4 sum drills to {out}" in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text().splitlines()][2:] == sum_drills(4, seed=3)
    with pytest.raises(SystemExit, match="--sum-drills at least 0"):
        cli(["synth", "--n", "4", "--out", str(out), "--sum-drills", "-1"])


def ids_of(text: str) -> set[str]:
    """The codes (ABC-1234) in a text."""
    return set(re.findall(r"[A-Z]{2,4}-[0-9]{3,5}", text))


@pytest.mark.parametrize("slip", SLIPS)
def test_every_teacher_slip_is_rejected_by_the_judge(slip):
    """Each way the teacher can slip, on every task where it can happen, fails the rubric."""
    from openk2.envs.synth import byte_tokenizer
    slipped = 0
    for task in TASKS:
        teacher = Teacher(task, seed=0)
        teacher.slip = slip
        r = run(trajectory(task, ScriptedClient([teacher.reply] * 16, byte_tokenizer(), name="oracle"), seed=0))
        slipped += teacher.slipped
        assert r["meta"]["passed"] != teacher.slipped, (task.id, r["meta"]["reasons"])
    assert slipped >= 5


def test_a_slipping_teacher_with_rejection_sampling():
    """--teacher-slips P: about a share P of episodes is rejected; another try draws again, so --tries
    recovers them; the data stays a function of the seed."""
    tasks = TASKS * 3
    once = synthesize(tasks, seed=0, slips=0.5)
    rejected = sum(not r["meta"]["passed"] for r in once) / len(once)
    assert 0.25 < rejected < 0.5  # a slip drawn for a task that cannot show it (no retry to skip) passes
    tried = synthesize(tasks, seed=0, slips=0.5, tries=4)
    passed = {r["meta"]["task"] for r in tried if r["meta"]["passed"]}
    assert len(passed) >= 0.9 * len(set(t.id for t in tasks)) and len(tried) > len(tasks)
    assert json.dumps(synthesize(tasks[:6], seed=0, slips=0.5)) == json.dumps(once[:6])


def without_weight_0(messages: list[dict]) -> list[dict]:
    """The conversation as training sees it turned: weight-0 turns and their calls' results left out."""
    hidden = {c["id"] for m in messages if m.get("weight") == 0 for c in m.get("tool_calls") or []}
    return [m for m in messages if m.get("weight", 1) and m.get("tool_call_id") not in hidden]


def test_a_correcting_teacher_shows_the_refused_call_and_trains_only_its_fix():
    """--teacher-corrections: a refused call (an undeclared tool, arguments against the schema) at
    weight 0, then the plan's call; without the refused turn the calls are the plain teacher's, the
    judge keeps every episode, and the SFT mask leaves out exactly the refused turn."""
    tasks = TASKS + pick_tasks(60, 5)
    plain, fixed = synthesize(tasks, seed=4), synthesize(tasks, seed=4, corrections=1.0)
    assert all(r["meta"]["passed"] for r in plain + fixed)
    made = Counter()
    for a, b in zip(plain, fixed):
        hidden = [m for m in b["messages"] if m.get("weight") == 0]
        assert len(hidden) == b["meta"].get("corrected", 0) <= 1
        strip = [{k: c[k] for k in ("name", "arguments")} for c in calls_of(without_weight_0(b["messages"]))]
        assert strip == [{k: c[k] for k in ("name", "arguments")} for c in calls_of(a["messages"])]
        if not hidden:
            continue
        i = b["messages"].index(hidden[0])
        (bad,), result, fix = hidden[0]["tool_calls"], b["messages"][i + 1], b["messages"][i + 2]
        declared = {t["function"]["name"] for t in b["tools"]}
        assert result["tool_call_id"] == bad["id"] and fix["role"] == "assistant" and fix["tool_calls"]
        if bad["function"]["name"] not in declared:
            made["unknown_tool"] += 1
            assert bad["function"]["name"] in load(b["meta"]["domain"])["operations"]  # the world's, not declared
            assert not held_out_with(bad["function"]["name"], [c["name"] for c in calls_of(a["messages"])])
            assert result["content"].split("the tools are: ")[1].rstrip(".") in fix["content"]  # read off the error
            assert result["content"].startswith(f"Error: there is no tool named {bad['function']['name']!r}")
            good = fix["tool_calls"][0]["function"]["name"]
            assert good in declared and good in fix["content"].split("Calling")[0]  # the fix names its tool first
        else:
            made["bad_arguments"] += 1
            assert result["content"].startswith(f"Error: invalid arguments for {bad['function']['name']}")
            listed = result["content"].split("; the arguments are: ")[1].rstrip(".")
            params, required = op_params(load(b["meta"]["domain"]), bad["function"]["name"])
            assert listed == ", ".join(f"{k} (required)" if k in required else k for k in params)
            assert listed in fix["content"].split("Calling")[0]  # the fix copies them off the error
            sent, meant = (json.loads(c["function"]["arguments"]) for c in (bad, fix["tool_calls"][0]))
            (key,) = {k for k in {*sent, *meant} if sent.get(k) != meant.get(k)}  # one argument made wrong
            made["missing" if key not in sent else "extra"] += key not in sent or key not in meant
        ids, mask = encode_with_mask(TOK, b["messages"], b["tools"])
        learned = TOK.decode([t for t, m in zip(ids, mask) if m])
        assert hidden[0]["content"] not in learned and fix["content"] in learned
        assert len({c["id"] for m in b["messages"] for c in m.get("tool_calls") or []}) == len(calls_of(b["messages"]))
    assert made["unknown_tool"] >= 10 and made["bad_arguments"] >= 10 and len(made) == 4, made  # both ways
    assert json.dumps(synthesize(tasks[:8], seed=4, corrections=1.0, workers=2)) == json.dumps(fixed[:8])
    # with slips beside them: a slip's call the schema refuses (a near-miss enum value) is never overlooked
    both = synthesize(tasks, seed=4, slips=0.5, corrections=0.5)
    assert all(r["meta"]["passed"] for r in both if "corrected" in r["meta"])
    assert sum("corrected" in r["meta"] for r in both) >= 10 and sum(not r["meta"]["passed"] for r in both) >= 10
    # renamed: a refused undeclared tool keeps its name (no new name is it), the error lists the new names
    from openk2.envs.rename import rename
    for r in fixed:
        if "corrected" in r["meta"]:
            out = rename(r, random.Random(0), "verb")
            names, i = out["meta"]["renamed"], next(n for n, m in enumerate(r["messages"]) if m.get("weight") == 0)
            bad, now = (x["messages"][i]["tool_calls"][0]["function"]["name"] for x in (r, out))
            assert now == names.get(bad, bad) and (bad in names or now not in names.values())
            error = out["messages"][i + 1]["content"]
            assert error.startswith("Error:") and not any(re.search(rf"\b{old}\b", error) for old in names)


def test_a_repeating_teacher_makes_the_refused_call_twice_then_fixes_it():
    """--teacher-repeats: the refused call again, the same, after a fix's words (weight 0 both), then
    the fix in words of its own; the other episodes and the trained calls are as without repeats."""
    tasks = TASKS + pick_tasks(60, 5)
    once, twice = synthesize(tasks, seed=4, corrections=1.0), synthesize(tasks, seed=4, corrections=1.0, repeats=1.0)
    assert all(r["meta"]["passed"] for r in twice)
    n = 0
    for a, b in zip(once, twice):
        assert ("corrected" in a["meta"]) == ("corrected" in b["meta"])  # the same episodes correct a call
        if "corrected" not in a["meta"]:
            assert json.dumps(a) == json.dumps(b)
            continue
        n += 1
        hidden = [i for i, m in enumerate(b["messages"]) if m.get("weight") == 0]
        assert b["meta"]["corrected"] == len(hidden) == 2 and hidden[1] == hidden[0] + 2
        def named(messages):
            return [{k: c[k] for k in ("name", "arguments")} for c in calls_of(messages)]
        assert named(without_weight_0(b["messages"])) == named(without_weight_0(a["messages"]))
        first, error, second, error2, fix = b["messages"][hidden[0]:hidden[0] + 5]
        (bad,), (bad2,) = first["tool_calls"], second["tool_calls"]
        assert bad["function"] == bad2["function"] and bad["id"] != bad2["id"] and error["content"] == error2["content"]
        good = fix["tool_calls"][0]["function"]["name"]
        mistake = "unknown_tool" if "there is no tool" in error["content"] else "bad_arguments"
        listed = re.escape(error["content"].rsplit("are: ", 1)[-1].rstrip("."))  # the tools, or the arguments
        values = {"bad": re.escape(bad["function"]["name"]), "good": good, "tools": listed, "args": listed,
                  "why": ".+"}

        def said(forms, text):  # a thought of one of these forms, the values copied off the error
            return any(re.fullmatch(re.sub(r"\\\{(\w+)\\\}", lambda m: values[m[1]], re.escape(f)), text)
                       for f in forms)
        assert said(FIXES[mistake], second["content"].split(" Calling ")[0])  # a fix's words, the call unfixed
        assert said(FIXES_AGAIN[mistake], fix["content"].split(" Calling ")[0])
        ids, mask = encode_with_mask(TOK, b["messages"], b["tools"])
        learned = TOK.decode([t for t, m in zip(ids, mask) if m])
        assert first["content"] not in learned and second["content"] not in learned and fix["content"] in learned
        kinds = {"Error: there is no tool": "unknown_tool", "Error: invalid arguments": "invalid_arguments"}
        episode = SimpleNamespace(transcript=b["messages"], tool_errors=[
            {"tool_call_id": m["tool_call_id"],
             "kind": next((k for p, k in kinds.items() if m["content"].startswith(p)), "tool_error")}
            for m in b["messages"] if m["role"] == "tool" and m["content"].startswith("Error:")])
        assert corrected_turns(episode) == hidden
    assert n >= 20
    half = synthesize(tasks, seed=4, corrections=1.0, repeats=0.5)
    assert Counter(r["meta"].get("corrected") for r in half).keys() == {None, 1, 2}


def test_cli_teacher_corrections(tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    cli(["synth", "--n", "20", "--seed", "2", "--out", str(out), "--worlds", "shop,files",
         "--teacher-corrections", "1"])
    said = re.search(r"wrote 20 trajectories \((\d+) with a corrected call\)", capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert said and int(said[1]) == sum("corrected" in r["meta"] for r in rows) > 0
    assert len(read_jsonl(out)) == 20  # weight 0 is what the SFT reader takes
    for bad in (["--teacher-corrections", "1.5"], ["--teacher-corrections", "0.2", "--teacher-endpoint", "http://x"],
                ["--teacher-repeats", "-0.5"]):
        with pytest.raises(SystemExit, match=f"{bad[0]} is a share in"):
            cli(["synth", "--n", "2", "--out", str(out), *bad])


def test_the_judge_overlooks_a_refused_call_only_when_it_is_corrected():
    """A refused call followed by the plan's call passes only with `corrected` (else: wrong tool); a
    refused call followed by an answer is never overlooked."""
    from openk2.envs.synth import byte_tokenizer
    task = next(t for t in TASKS if t.kind == "single" and t.tools and any(
        not held_out_with(x, t.rubric.tools) for x in set(load(t.domain)["operations"]) - set(t.tools)))
    for seed in range(20):  # whether a round makes the mistake is drawn per round: take a seed where it does
        teacher = Teacher(task, seed=seed, corrections=1.0)
        teacher.correction = "unknown_tool"
        kept = run(trajectory(task, ScriptedClient([teacher.reply] * 16, byte_tokenizer()), seed=0, corrected=True))
        if teacher.refused:
            break
    assert teacher.refused and kept["meta"]["passed"] and kept["meta"]["corrected"] == 1
    again = Teacher(task, seed=teacher.seed, corrections=1.0)
    again.correction = "unknown_tool"
    strict = run(trajectory(task, ScriptedClient([again.reply] * 16, byte_tokenizer()), seed=0))
    assert not strict["meta"]["passed"] and "wrong_tool" in strict["meta"]["rejected_by"]
    assert all("weight" not in m for m in strict["messages"])
    wrong = {"id": "functions.nope:0", "type": "function", "function": {"name": "nope", "arguments": "{}"}}
    quits = ScriptedClient([{"tool_calls": [wrong]}, {"content": "I could not do it."}], byte_tokenizer())
    r = run(trajectory(task, quits, seed=0, corrected=True))
    assert not r["meta"]["passed"] and "corrected" not in r["meta"] and all("weight" not in m for m in r["messages"])
    twice = ScriptedClient([{"tool_calls": [wrong]}, {"tool_calls": [{**wrong, "id": "functions.nope:1"}]},
                            {"content": "I could not do it."}], byte_tokenizer())
    r = run(trajectory(task, twice, seed=0, corrected=True))  # refused, refused again: nothing went past it
    assert "corrected" not in r["meta"] and all("weight" not in m for m in r["messages"])
    errors = [{"tool_call_id": m["tool_call_id"], "kind": "unknown_tool"} for m in kept["messages"]
              if m["role"] == "tool" and m["content"].startswith("Error: there is no tool")]
    episode = SimpleNamespace(transcript=kept["messages"], tool_errors=errors)
    refused_at = [i for i, m in enumerate(kept["messages"]) if m.get("weight") == 0]
    assert corrected_turns(episode) == refused_at and corrected_turns(episode, ids=teacher.refused) == refused_at
    assert corrected_turns(episode, ids=set()) == []  # not the teacher's own mistake: judged as it is


def test_deterministic_per_seed_in_one_process_or_several():
    tasks = TASKS[:8]
    a, b = synthesize(tasks, seed=5), synthesize(tasks, seed=5, workers=2)
    assert json.dumps(a) == json.dumps(b)
    c = synthesize(tasks, seed=6)
    assert [r["meta"]["passed"] for r in c] == [True] * 8
    assert [r["messages"] for r in c] != [r["messages"] for r in a]  # another seed, other phrasings
    assert pick_tasks(10, 2, kinds=["single"]) == pick_tasks(10, 2, kinds=["single"])


def test_tasks_from_one_part_of_a_split_and_no_failures(tmp_path, capsys):
    train = pick_tasks(30, 1, split_by="combo", part="train")
    test = pick_tasks(10, 1, split_by="combo", part="test")
    assert len(train) == 30 and len(test) == 10
    assert not {"+".join(t.rubric.tools) for t in test} & {"+".join(t.rubric.tools) for t in train}
    assert split(train, "combo")[1] == [] and split(test, "combo")[0] == []
    out = tmp_path / "d.jsonl"
    cli(["synth", "--n", "20", "--out", str(out), "--no-failures", "--split", "domain"])
    metas = [json.loads(line)["meta"] for line in out.read_text().splitlines()]
    assert "recovery" not in {m["kind"] for m in metas} and len({m["domain"] for m in metas}) == len(domain_names()) - 1
    with pytest.raises(SystemExit, match="unknown world"):
        cli(["synth", "--n", "2", "--out", str(out), "--worlds", "bank,moon"])
    with pytest.raises(SystemExit, match="needs --judge-endpoint"):
        cli(["synth", "--n", "2", "--out", str(out), "--judge", "llm"])


def test_pairs_draws_tasks_that_mix_two_domains_tools(tmp_path, capsys):
    """--pairs: the merged world of every two of --worlds, whatever their order; parallel, multi-turn and
    single tasks there; a kept trajectory may call tools of both domains in one turn."""
    from openk2.envs.synth import pairs
    assert pairs(["units", "bank", "shop"]) == ["bank+shop", "bank+units", "shop+units"]
    out = tmp_path / "mixed.jsonl"
    cli(["synth", "--worlds", "units,bank,shop", "--pairs", "--n", "30", "--seed", "2", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["meta"]["domain"] for r in records} == {"bank+shop", "bank+units", "shop+units"}
    assert {r["meta"]["kind"] for r in records} == {"parallel", "multi_turn", "single"}
    home = {op: d for d in ("bank", "shop", "units") for op in load(d)["operations"]}
    assert sum(len({home[c["function"]["name"]] for c in m["tool_calls"]}) == 2
               for r in records for m in r["messages"] if m.get("tool_calls")) >= 3
    for bad in (["--worlds", "bank"], ["--worlds", "bank+shop,units"]):
        with pytest.raises(SystemExit, match="--pairs merges every two"):
            cli(["synth", "--pairs", "--n", "2", "--out", str(out), *bad])


# ---------------------------------------------------------------- LLM teacher and judge over HTTP

def completion(message: dict, finish: str = "stop") -> dict:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", **message}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def endpoint(handler, client_class=None):
    """An OpenAIClient whose endpoint is `handler(request body) -> completion` (httpx2 mock transport)."""
    httpx2 = pytest.importorskip("httpx2")
    from openk2.agent.client import OpenAIClient

    def respond(request):
        out = handler(json.loads(request.content))
        return out if isinstance(out, httpx2.Response) else httpx2.Response(200, json=out)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(respond))
    return (client_class or OpenAIClient)("http://endpoint/v1", "m", context_window=100_000, http_client=http)


def test_llm_teacher_against_a_scripted_endpoint_with_rejection_sampling(tmp_path):
    tasks = [t for t in TASKS if t.domain == "bank"]
    by_request = {t.turns[0]: t for t in tasks}
    starts, seen = {}, []

    def handler(body):  # plays the oracle, except that each task's first episode gives up at once
        seen.append(body)
        talk = [m for m in body["messages"] if m["role"] != "system"]  # after the system prompt eval uses too
        task = by_request[talk[0]["content"]]
        if len(talk) == 1:
            starts[task.id] = starts.get(task.id, 0) + 1
        if starts[task.id] == 1:
            return completion({"content": "I cannot help with that."})
        reply = Oracle(task).reply(body["messages"], body["tools"])
        return completion(reply, "tool_calls" if reply.get("tool_calls") else "stop")

    records = synthesize(tasks, seed=1, client=endpoint(handler), tries=2, temperature=0.7, concurrency=3)
    assert [r["meta"]["task"] for r in records] == [t.id for t in tasks for _ in range(2)]
    for first, second in zip(records[::2], records[1::2]):
        assert not first["meta"]["passed"] and first["meta"]["try"] == 0
        assert set(first["meta"]["rejected_by"]) & {"wrong_answer", "missing_call", "too_few_calls"}
        assert second["meta"]["passed"] and second["meta"]["teacher"] == "m", second["meta"]["reasons"]
    assert all(b["temperature"] == 0.7 and b["tools"] and isinstance(b["seed"], int) for b in seen)
    firsts = [b for b in seen if len(b["messages"]) == 2 and b["messages"][0]["content"] == SYSTEM]
    assert len({b["seed"] for b in firsts}) == 2 * len(tasks)  # a seed per try


@pytest.mark.parametrize("reply, passed, reason", [
    ('{"passed": true, "reasons": []}', True, None),
    ('{"passed": false, "reasons": ["the transfer was never made"]}', False, "llm_judge"),
    ('Looks good to me! {"passed": true}', False, "judge_unparsed"),
    ('{"passed": "yes"}', False, "judge_unparsed"),
    (400, False, "judge_error"),
])
def test_llm_judge_against_a_scripted_endpoint(reply, passed, reason):
    httpx2 = pytest.importorskip("httpx2")
    task = next(t for t in TASKS if t.kind == "chain")
    prompts = []

    def handler(body):
        prompts.append(body["messages"][-1]["content"])
        if reply == 400:
            return httpx2.Response(400, json={"error": {"message": "bad model", "type": "invalid_request_error"}})
        return completion({"content": reply})

    r = run(trajectory(task, programmatic_client(task, 0), 0, judge="both", llm_judge=LLMJudge(endpoint(handler))))
    assert r["meta"]["passed"] is passed and (reason is None or reason in r["meta"]["rejected_by"]), r["meta"]
    for cp in task.rubric.checkpoints:  # the criteria and the conversation are in the judge's prompt
        assert all(f"{c['name']}({json.dumps(c['arguments'])})" in prompts[0] for c in cp["calls"])
    assert task.turns[0] in prompts[0] and "[tool result" in prompts[0]
    assert parse_verdict('{"passed": false}') == (False, ["judge: failed, no reason given"])


def test_llm_teacher_against_our_own_server():
    pytest.importorskip("uvicorn")
    from test_server import serving

    from dataclasses import replace

    from openk2.agent.client import OpenAIClient
    from openk2.config import PRESETS
    from openk2.model import build_model
    from openk2.server import create_app

    task = next(t for t in TASKS if t.kind == "single" and t.domain == "units")  # the shortest tool declarations
    model = build_model(replace(PRESETS["k2-tiny"], max_position_embeddings=4096), seed=0)
    with serving(create_app(model, TOK, "k2-tiny")) as port:
        client = OpenAIClient(f"http://127.0.0.1:{port}/v1")
        r = run(trajectory(task, client, 0, temperature=0.0, max_tokens=6))
    assert r["meta"]["teacher"] == "k2-tiny" and not r["meta"]["passed"]  # random weights: rejected, with why
    assert [m["role"] for m in r["messages"][:3]] == ["system", "user", "assistant"]
    assert r["messages"][0]["content"] == SYSTEM and r["messages"][1]["content"] == task.turns[0]
    assert r["meta"]["reasons"] and r["meta"]["rejected_by"]


def test_cli_with_an_llm_teacher_keeps_failed_trajectories_on_request(tmp_path, capsys, monkeypatch):
    import openk2.agent.client

    def give_up(body):
        return completion({"content": "I cannot help with that."})

    real = openk2.agent.client.OpenAIClient
    monkeypatch.setattr(openk2.agent.client, "OpenAIClient", lambda url, model: endpoint(give_up, real))
    out = tmp_path / "all.jsonl"
    args = ["synth", "--n", "4", "--kinds", "single", "--teacher-endpoint", "http://endpoint/v1", "--out", str(out)]
    cli(args)
    assert out.read_text() == "" and "wrote 0 trajectories" in capsys.readouterr().out
    cli(args + ["--keep-failed"])
    metas = [json.loads(line)["meta"] for line in out.read_text().splitlines()]
    assert len(metas) == 4 and not any(m["passed"] for m in metas) and all("missing_call" in m["rejected_by"]
                                                                           for m in metas)
    assert "single               4       0         4  " in capsys.readouterr().out


def test_renamed_tools_are_renamed_everywhere_and_rename_back_to_the_original(tmp_path, capsys):
    from openk2.envs.rename import STYLES, apply, rename, rename_share, world_names
    from openk2.tokenizer.toolcalls import parse_tool_calls

    records = synthesize(TASKS, seed=2)
    assert all(r["meta"]["passed"] and r["tools"] for r in records)  # a no-tool task still offers tools
    toolless = drills(1, seed=0)[0]
    assert rename(toolless, random.Random(0)) is toolless  # nothing to rename
    seen_styles = Counter()
    for i, r in enumerate(records):
        style = STYLES[i % len(STYLES)]
        out = rename(r, random.Random(i), style)
        names = out["meta"]["renamed"]
        seen_styles[style] += 1
        new = list(names.values())
        assert set(names) == {t["function"]["name"] for t in r["tools"]} and len(set(new)) == len(new)
        assert not set(new) & world_names()
        # the declaration: new names, the same descriptions and parameters, in the same order
        assert [names[t["function"]["name"]] for t in r["tools"]] == [t["function"]["name"] for t in out["tools"]]
        assert [{**t["function"], "name": None} for t in r["tools"]] == \
            [{**t["function"], "name": None} for t in out["tools"]]
        # no old name is left in what the model writes or reads back; users' words and values are untouched
        for old, m in zip(r["messages"], out["messages"]):
            if m["role"] in ("system", "user"):
                assert m == old
            elif m["role"] == "tool":  # a result as it was (errors say the new names: tested with corrections)
                assert m["name"] == names[old["name"]] and (m["content"] == old["content"]
                                                           or old["content"].startswith("Error:"))
            else:
                said = json.dumps([m.get("content"), m.get("tool_calls")])
                assert not any(re.search(rf"(?<![\w.]){n}(?!\w)", said) for n in names), said
                assert [c["function"]["arguments"] for c in m.get("tool_calls") or []] == \
                    [c["function"]["arguments"] for c in old.get("tool_calls") or []]
        # the chat template renders it, and K2's call parser reads the new names and ids back
        ids, mask = encode_with_mask(TOK, out["messages"], out["tools"])
        learned = TOK.decode([t for t, k in zip(ids, mask) if k])
        called = [c for m in out["messages"] if m["role"] == "assistant" for c in m.get("tool_calls") or []]
        parsed = parse_tool_calls(learned).tool_calls
        assert [(c.id, c.name) for c in parsed] == [(c["id"], c["function"]["name"]) for c in called]
        assert all(c["id"].startswith(f"functions.{c['function']['name']}:") for c in called)
        # and renaming back gives the original trajectory
        back = apply(out, {v: k for k, v in names.items()})
        assert back["messages"] == r["messages"] and back["tools"] == r["tools"]
    assert min(seen_styles[s] for s in STYLES) >= 5
    shared = rename_share(records, 0.5, seed=4)
    assert json.dumps(shared) == json.dumps(rename_share(records, 0.5, seed=4))
    share = sum("renamed" in r["meta"] for r in shared) / sum(bool(r["tools"]) for r in records)
    assert 0.3 < share < 0.7
    assert rename_share([toolless] * 20, 1.0, seed=4) == [toolless] * 20  # only trajectories with tools
    out = tmp_path / "renamed.jsonl"
    cli(["synth", "--n", "6", "--seed", "3", "--out", str(out), "--worlds", "bank", "--rename-tools", "1"])
    assert f"wrote 6 trajectories (6 with renamed tools) to {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--rename-tools is a share in"):
        cli(["synth", "--n", "4", "--out", str(out), "--rename-tools", "1.5"])
