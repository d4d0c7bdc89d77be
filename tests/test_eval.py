"""`openk2 eval tools`: the metrics on scripted trajectories whose answers are known (the oracle scores
100 % with no failures; each deliberately wrong client lands in its failure kind and moves the right
metrics), the endpoint path end to end through the CLI against a scripted OpenAI-compatible server,
and the checkpoint path in process on a tiny model, whose rows equal those taken over HTTP from
`openk2 serve`'s app on the same weights."""

import asyncio
import dataclasses
import json
import time

import pytest

from openk2.agent.client import ScriptedClient
from openk2.agent.runtime import Budget
from openk2.envs import Oracle
from openk2.envs.evaluate import FAILURES, SYSTEM, evaluate, expected_calls, held_out, report, summarize, table

TASKS = held_out("seed", "test", 40, seed=3)
BUDGET = Budget(max_turns=4, max_tokens=4096, turn_tokens=256)


def first(kind, n_steps=None):
    return next(t for t in TASKS if t.kind == kind and (n_steps is None or len(t.plan) == n_steps))


def run(task, turn, budget=BUDGET):
    """One task's result with `turn(task, messages, tools)` as the model."""
    client = ScriptedClient([lambda m, t: turn(task, m, t)] * 20)
    return asyncio.run(evaluate([task], lambda _: client, budget, progress=False))[0]


def call(name, arguments, n=0):
    return {"tool_calls": [{"id": f"functions.{name}:{n}", "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def once(then):
    """The model's turn: `then(task, tools)` first, an answer after (a one-turn task)."""
    return lambda task, messages, tools: ({"content": "Done."} if any(m["role"] == "assistant" for m in messages)
                                          else then(task, tools))


def oracle_turn(task, messages, tools):
    return Oracle(task).reply(messages)


def wrong_tool(task, tools):
    other = next(t["function"]["name"] for t in tools if t["function"]["name"] != task.plan[0]["tool"])
    return call(other, "{}")


def bad_json(task, tools):  # as an endpoint returns it: the arguments string is not JSON
    return call(task.plan[0]["tool"], '{"' + next(iter(task.plan[0]["arguments"]), "x") + '": ')


def bad_markers(task, tools):  # as the model writes it: our parser cannot read the call and drops it
    return {"content": f"<|tool_calls_section_begin|><|tool_call_begin|>{task.plan[0]['tool']}"
                       "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"}


def wrong_args(task, tools):
    args = {k: (v + "-0" if isinstance(v, str) else v + 1) for k, v in task.plan[0]["arguments"].items()}
    return call(task.plan[0]["tool"], json.dumps(args))


def no_call(task, messages, tools):
    return {"content": "I would rather not look that up."}


def first_step_only(task, messages, tools):  # a chain: the first call, then an answer without the second
    if messages[-1]["role"] == "tool":
        return {"content": "I found it."}
    return Oracle(task).reply(messages)


def loop(task, messages, tools):  # the first call of the plan, again and again
    reply = Oracle(task).reply(messages[:2])
    n = sum(len(m.get("tool_calls") or []) for m in messages)
    return call(reply["tool_calls"][0]["function"]["name"], reply["tool_calls"][0]["function"]["arguments"], n)


def test_the_oracle_scores_everything_and_fails_nothing():
    rs = asyncio.run(evaluate(TASKS, lambda t: ScriptedClient([Oracle(t).reply] * 30), progress=False))
    assert {t.kind for t in TASKS} == {"single", "parallel", "chain", "multi_turn", "recovery", "no_tool"}
    assert all(r["success"] and r["failure"] is None and not r["reasons"] for r in rs), [r["reasons"] for r in rs]
    rows = report({("seed", "test"): rs})
    assert [r["kind"] for r in rows] == sorted({t.kind for t in TASKS}) + ["all", "all"]
    for row in rows:
        if row["kind"] == "no_tool":  # nothing to call, nothing called
            assert row["calls"] == 0 and row["format_validity"] is None and row["tool_name"] is None
            continue
        assert (row["success"], row["format_validity"], row["tool_name"], row["arguments"]) == (1.0,) * 4
        assert row["failures"] == {}
    everything = rows[-1]
    assert everything["tasks"] == len(TASKS) and everything["calls"] == sum(r["calls"] for r in rs)
    assert everything["mean_turns"] == sum(r["turns"] for r in rs) / len(rs)
    # a recovery task retries its failed call: a turn more than its plan's steps need
    rec = next(r for r, t in zip(rs, TASKS) if t.kind == "recovery")
    assert rec["calls"] > rec["expected_calls"] and rec["tool_name"] == rec["arguments"] == rec["expected_calls"]


@pytest.mark.parametrize("turn, kind, calls, valid, name, args", [
    (once(wrong_tool), "wrong_tool", 1, 1, 0, 0),
    (once(bad_json), "bad_json", 1, 0, 1, 0),
    (once(bad_markers), "bad_json", 1, 0, 0, 0),
    (once(wrong_args), "wrong_args", 1, 1, 1, 0),
    (no_call, "no_call", 0, 0, 0, 0),
])
def test_each_wrong_client_in_its_failure_kind(turn, kind, calls, valid, name, args):
    task = first("single")
    r = run(task, turn)
    assert not r["success"] and r["failure"] == kind, r
    assert (r["calls"], r["valid_calls"], r["expected_calls"], r["tool_name"], r["arguments"]) == \
        (calls, valid, 1, name, args)
    s = summarize([r])
    assert s["failures"] == {kind: 1} and s["success"] == 0.0
    assert s["format_validity"] == (None if calls == 0 else valid / calls)


def test_gave_up_and_over_budget():
    chain = first("chain")
    r = run(chain, first_step_only)
    assert r["failure"] == "gave_up" and r["stop_reason"] == "answered"
    assert (r["expected_calls"], r["tool_name"], r["arguments"], r["valid_calls"]) == (2, 1, 1, 1)
    single = first("single")
    r = run(single, loop)
    assert r["failure"] == "over_budget" and r["stop_reason"] == "max_turns" and r["turns"] == BUDGET.max_turns
    assert (r["calls"], r["valid_calls"], r["tool_name"], r["arguments"]) == (4, 4, 1, 1)  # right call, no end
    r = run(first("no_tool"), lambda task, m, tools: {"content": "x" * 50}, Budget(turn_tokens=8))
    assert r["failure"] == "over_budget" and r["stop_reason"] == "length"


def test_summary_micro_averages_over_calls_and_expected_calls():
    task = first("single")
    rs = [run(task, once(wrong_tool)), run(task, once(bad_json)), run(task, oracle_turn), run(task, no_call)]
    s = summarize(rs)
    assert s["tasks"] == 4 and s["success"] == 0.25 and s["calls"] == 3
    assert s["format_validity"] == 2 / 3 and s["tool_name"] == 2 / 4 and s["arguments"] == 1 / 4
    assert s["failures"] == {"bad_json": 1, "wrong_tool": 1, "no_call": 1}
    assert list(s["failures"]) == [k for k in FAILURES if k in s["failures"]]
    text = table(report({("seed", "test"): rs}))
    assert "| seed | test | single | 4 | 25.0 | 66.7 | 50.0 | 25.0 |" in text
    assert "bad_json 1, wrong_tool 1, no_call 1" in text


def test_expected_calls_resolve_references_as_the_oracle_does():
    chain = first("chain")
    steps = expected_calls(chain)
    assert len(steps) == 2 and not any(isinstance(v, dict) for s in steps for v in s["arguments"].values())
    calls, _, _ = Oracle(chain).solve(chain.world())
    assert [(c["name"], c["arguments"]) for c in calls] == [(s["name"], s["arguments"]) for s in steps]


def test_held_out_parts_are_disjoint_and_stable():
    test, train = held_out("combo", "test", 10), held_out("combo", "train", 30)
    assert len(test) == 10 and not {t.id for t in test} & {t.id for t in train}
    assert all(len(t.rubric.tools) > 1 for t in test)
    assert [t.id for t in held_out("combo", "test", 5)] == [t.id for t in test[:5]]
    domain = held_out("domain", "test", 8)
    assert len({t.domain for t in domain}) == 1
    assert domain[0].domain not in {t.domain for t in held_out("domain", "train", 30)}
    with pytest.raises(ValueError, match="unknown part"):
        held_out("seed", "dev", 2)


def test_in_distribution_tasks_hold_nothing_the_training_split_kept_out():
    """`trained_on`: seed (and args) test tasks drawn from the train part of the split the data came
    from. Plain seed test tasks include combinations that the combo split holds out (they are its test
    tasks too); drawn for a model trained on combo's train part, none is, and the two test sets are
    disjoint. The seed split still decides: every task is a seed test task, in the order it had."""
    from openk2.envs.splits import held_out_combo, in_distribution, split

    plain, drawn = held_out("seed", "test", 200), held_out("seed", "test", 100, trained_on="combo")
    assert any(held_out_combo(t.rubric.tools) for t in plain)
    assert not any(held_out_combo(t.rubric.tools) for t in drawn)
    assert [t.id for t in drawn] == [t.id for t in plain if not held_out_combo(t.rubric.tools)][:100]
    assert not {t.id for t in drawn} & {t.id for t in held_out("combo", "test", 300)}
    assert split(drawn, "seed")[0] == []  # all in the seed split's test part
    assert [t.id for t in held_out("seed", "test", 30, trained_on="combo")] == [t.id for t in drawn[:30]]
    assert not any(held_out_combo(t.rubric.tools) for t in held_out("args", "test", 50, trained_on="combo"))
    assert [t.id for t in held_out("combo", "test", 5, trained_on="combo")] == \
        [t.id for t in held_out("combo", "test", 5)]  # a split's own train part: no filter
    unseen = held_out("seed", "test", 20, trained_on="domain")
    assert not {t.domain for t in unseen} & {t.domain for t in held_out("domain", "test", 20)}
    assert [in_distribution(by, "combo") for by in ("seed", "args", "combo", "domain")] == \
        ["combo", "combo", None, None]
    with pytest.raises(ValueError, match="unknown split 'memory'"):
        held_out("seed", "test", 2, trained_on="memory")


# ---------------------------------------------------------------- through the CLI

def oracle_endpoint(tasks):
    """A scripted OpenAI-compatible server: each task's oracle answers its conversations."""
    from fastapi import FastAPI

    app, by_text = FastAPI(), {t.turns[0]: t for t in tasks}

    @app.get("/health")
    def health():
        return {}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "oracle", "object": "model", "max_model_len": 131072}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        messages = body["messages"]
        assert messages[0] == {"role": "system", "content": SYSTEM}
        reply = Oracle(by_text[messages[1]["content"]]).reply(messages)
        return {"id": "x", "object": "chat.completion", "created": int(time.time()), "model": "oracle",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None, **reply},
                             "finish_reason": "tool_calls" if reply.get("tool_calls") else "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    return app


def test_endpoint_through_the_cli(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    from test_server import serving

    from openk2.cli import main

    tasks = held_out("seed", "test", 2, trained_on="domain") + held_out("combo", "test", 2)  # no weather task
    with serving(oracle_endpoint(tasks)) as port:
        main(["eval", "tools", "--endpoint", f"http://127.0.0.1:{port}/v1", "--split", "seed,combo", "--n", "2",
              "--trained-on", "domain", "--json", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith("| split | part | kind | tasks | success %")
    assert set(out) == {"config", "seconds", "failure_kinds", "rows", "groups", "tasks"}
    assert out["config"]["model"] == "oracle" and out["config"]["split"] == "seed,combo"
    assert "api_key" not in out["config"] and "fn" not in out["config"]
    assert out["groups"] == {"seed/test": [t.id for t in tasks[:2]], "combo/test": [t.id for t in tasks[2:]]}
    assert len(out["tasks"]) == len({t.id for t in tasks})
    for row in out["rows"]:
        assert set(row) == {"split", "part", "kind", "tasks", "success", "format_validity", "tool_name", "arguments",
                            "mean_turns", "calls", "failures", "stop_reasons"}
        assert row["stop_reasons"] == {"answered": row["tasks"]}
        assert row["success"] == 1.0 and row["failures"] == {}
        assert f"| {row['split']} | {row['part']} | {row['kind']} | {row['tasks']} | 100.0 |" in stdout
    assert [r["kind"] for r in out["rows"] if r["split"] == "overall"] == ["all"]
    assert all(r["messages"][0]["role"] == "system" for r in out["tasks"])


def test_checkpoint_in_process_equals_the_server(tmp_path, capsys):
    """A tiny random K2 saved as a HF folder: `openk2 eval tools FOLDER` (the in-process EngineClient)
    and `--endpoint` on `openk2 serve`'s app over the same weights give the same rows, greedy."""
    pytest.importorskip("uvicorn")
    from test_server import serving

    from openk2.checkpoint import load_hf, save_hf
    from openk2.cli import main
    from openk2.config import PRESETS
    from openk2.model import build_model
    from openk2.server import create_app
    from openk2.server.chat_format import ChatFormat

    cfg = dataclasses.replace(PRESETS["k2-tiny"], max_position_embeddings=4096)
    folder = save_hf(build_model(cfg, seed=0), tmp_path / "tiny", progress=False)
    flags = ["--split", "domain", "--n", "2", "--turn-tokens", "8", "--max-turns", "2"]  # weather: the shortest prompts
    main(["eval", "tools", str(folder), *flags, "--json", str(tmp_path / "local.json")])
    model = load_hf(folder).eval()
    with serving(create_app(model, ChatFormat.for_model(model).tokenizer, "tiny")) as port:
        url = f"http://127.0.0.1:{port}/v1"
        main(["eval", "tools", "--endpoint", url, *flags, "--json", str(tmp_path / "http.json")])
    local, http = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "http"))
    assert local["config"]["model"] == "tiny" and http["config"]["model"] == "tiny"
    assert local["rows"] == http["rows"]
    for r in local["tasks"]:  # a random model: nothing solved, and each failure has its kind
        assert not r["success"] and r["failure"] in FAILURES and 1 <= r["turns"] <= 2
    assert local["rows"][-1]["tasks"] == 2 and sum(local["rows"][-1]["failures"].values()) == 2
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    ([], "give a checkpoint PATH, --endpoint URL or --oracle"),
    (["k2-tiny", "--endpoint", "http://127.0.0.1:9/v1"], "give a checkpoint PATH, --endpoint URL or --oracle"),
    (["k2-tiny", "--split", "seed,memory"], "unknown split or part ['memory']"),
    (["k2-tiny", "--part", "dev"], "unknown split or part ['dev']"),
    (["--endpoint", "http://127.0.0.1:9/v1", "--model", "m"], "every model call failed; the first: stopped: model_"),
])
def test_bad_flags_fail_with_one_clear_line(argv, message):
    from openk2.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "tools", *argv, "--n", "1"])
    assert message in str(e.value)


def test_the_oracle_through_the_cli(capsys):
    from openk2.cli import main

    main(["eval", "tools", "--oracle", "--split", "domain,args", "--n", "4"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows if r[2] == "all"] == ["| domain", "| args", "| overall"]
    assert all(r[4] == "100.0" and r[-1] == "– |" for r in rows)
