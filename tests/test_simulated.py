"""The LLM-simulated roles of synthesis (openk2/envs/simulated.py) for tools without a programmatic
world: the task writer, the stateful tool simulator, the user simulator and the LLM judge on such
tasks, each against a scripted OpenAI-compatible endpoint; tool schemas read from our own MCP server;
`openk2 synth --tools` end to end; and the roles against our own server."""

import asyncio
import json
import os
import re
import sys

import pytest

from openk2.cli import main as cli
from openk2.envs.judge import LLMJudge, category
from openk2.envs.simulated import (KIND_BRIEFS, LLMTaskWriter, LLMUser, OpenTask, SimulatedTools, mcp_tool_schemas,
                                   read_tools_file, write_tasks)
from openk2.envs.synth import trajectory
from openk2.envs.tasks import SYSTEM

httpx2 = pytest.importorskip("httpx2")
from test_synth import completion, endpoint  # noqa: E402

NOTES = [
    {"type": "function", "function": {"name": "create_note", "description": "Save a note; returns its id.",
     "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}},
    {"type": "function", "function": {"name": "get_note", "description": "Read a note by its id.",
     "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}},
]
WRITTEN = {
    "multi_turn": {"request": "Save a note saying: buy milk", "follow_ups": ["Now read that note back to me."],
                   "goal": "store a note and hear it back", "tools": ["create_note", "get_note"],
                   "criteria": ["create_note is called with text 'buy milk'", "the last answer says 'buy milk'"]},
    "recovery": {"request": "Save a note saying: call Ann", "goal": "store a note", "tools": ["create_note"],
                 "criteria": ["create_note is called with text 'call Ann'"]},
    "missing": {"request": "Read note N7 back to me.", "goal": "hear a note that is not there", "tools": ["get_note"],
                "criteria": ["get_note is called with id N7"]},
}


def run(coro):
    return asyncio.run(coro)


def role(body) -> str:
    system = body["messages"][0]["content"]
    return next(name for key, name in [("write tasks", "writer"), ("simulate the backend", "simulator"),
                                       ("play a user", "user"), ("strict grader", "judge"), (SYSTEM, "teacher")]
                if key in system)


class World:
    """A scripted endpoint playing every role over the NOTES tools, recording each role's prompts."""

    def __init__(self, verdict='{"passed": true, "reasons": []}'):
        self.prompts, self.verdict = {}, verdict

    def __call__(self, body):
        who = role(body)
        self.prompts.setdefault(who, []).append(body)
        text = body["messages"][-1]["content"]
        if who == "writer":
            kind = next(k for k in WRITTEN if KIND_BRIEFS[k] in text)  # recovery's brief is single's
            return completion({"content": json.dumps(WRITTEN[kind])})
        if who == "simulator":  # a store: ids count the notes made; a read finds the text in the earlier calls
            if text.split("Now: ")[1].startswith("create_note"):
                made = text.count('-> {"id"')  # the notes made before, failed calls not counted
                return completion({"content": json.dumps({"id": f"N{made}"})})
            wanted = json.loads(re.search(r"Now: get_note\((.*)\)", text).group(1))["id"]
            made = re.findall(r'create_note\((\{.*?\})\) -> \{"id": "(N\d+)"\}', text)
            found = [json.loads(args)["text"] for args, i in made if i == wanted]
            return completion({"content": json.dumps({"text": found[0]} if found else {"error": f"no note {wanted}"})})
        if who == "user":
            asked = text.count("[user]")
            return completion({"content": "Now read that note back to me." if asked == 1 and "2. " in text
                               else "DONE"})
        if who == "judge":
            return completion({"content": self.verdict})
        return self.teacher(body)

    @staticmethod
    def teacher(body):
        talk = body["messages"]
        last = talk[-1]
        n = sum(len(m.get("tool_calls") or []) for m in talk)
        call = lambda name, args: completion({"tool_calls": [{"id": f"functions.{name}:{n}", "type": "function",  # noqa: E731
                                             "function": {"name": name, "arguments": json.dumps(args)}}]}, "tool_calls")
        if last["role"] == "user" and last["content"].startswith("Save a note saying: "):
            return call("create_note", {"text": last["content"].removeprefix("Save a note saying: ")})
        if last["role"] == "user" and (asked := re.match(r"Read note (N\d+)", last["content"])):
            return call("get_note", {"id": asked[1]})
        if last["role"] == "user":
            made = next(json.loads(m["content"])["id"] for m in talk if m["role"] == "tool" and '"id"' in m["content"])
            return call("get_note", {"id": made})
        if "temporarily unavailable" in last["content"]:  # retry the failed call
            prev = next(m for m in reversed(talk) if m.get("tool_calls"))["tool_calls"][0]["function"]
            return call(prev["name"], json.loads(prev["arguments"]))
        return completion({"content": f"Done: {last['content']}"})


def synth_notes(tmp_path, monkeypatch, kinds: str) -> tuple:
    """`openk2 synth --tools notes.json` with every role played by the scripted endpoint: (it, the records)."""
    import openk2.agent.client

    scripted = World()
    real = openk2.agent.client.OpenAIClient
    monkeypatch.setattr(openk2.agent.client, "OpenAIClient", lambda url, model: endpoint(scripted, real))
    (tmp_path / "notes.json").write_text(json.dumps(NOTES))
    out = tmp_path / "open.jsonl"
    cli(["synth", "--tools", str(tmp_path / "notes.json"), "--teacher-endpoint", "http://endpoint/v1", "--n",
         str(len(kinds.split(","))), "--kinds", kinds, "--out", str(out), "--concurrency", "1"])
    return scripted, [json.loads(line) for line in out.read_text().splitlines()]


def test_cli_synthesises_llm_written_tasks_on_simulated_tools(tmp_path, capsys, monkeypatch):
    scripted, records = synth_notes(tmp_path, monkeypatch, "multi_turn,recovery")
    assert [r["meta"]["kind"] for r in records] == ["multi_turn", "recovery"]
    assert all(r["meta"]["passed"] and r["meta"]["judge"] == "llm" and r["meta"]["domain"] == "notes" for r in records)
    multi = records[0]["messages"]
    assert [m["role"] for m in multi] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant",
                                          "tool", "assistant"]
    assert multi[5]["content"] == "Now read that note back to me."  # the user simulator's follow-up
    assert json.loads(multi[7]["content"]) == {"text": "buy milk"}  # the simulator kept the state it invented
    recovery = records[1]["messages"]
    results = [m["content"] for m in recovery if m["role"] == "tool"]
    assert "temporarily unavailable" in results[0] and json.loads(results[1]) == {"id": "N0"}
    assert len([b for b in scripted.prompts["simulator"] if "create_note" in b["messages"][-1]["content"]]) == 3
    # the judge saw the writer's criteria, the injected failure's criterion and the conversation
    judged = [b["messages"][-1]["content"] for b in scripted.prompts["judge"]]
    assert "create_note is called with text 'buy milk'" in judged[0] and "[tool result create_note]" in judged[0]
    assert "after create_note fails once with a temporary error, the assistant calls it again" in judged[1]
    assert "changed in the world" not in judged[0]
    assert records[0]["tools"] == NOTES and "wrote 2 trajectories" in capsys.readouterr().out


def test_the_llm_judge_rejects_and_problems_reject(monkeypatch):
    scripted = World('{"passed": false, "reasons": ["the note was never read back"]}')
    client = endpoint(scripted)
    task = run(LLMTaskWriter(client)(NOTES, "multi_turn", 3, "notes"))
    r = run(trajectory(task, client, 0, judge="llm", llm_judge=LLMJudge(client), sim=client))
    assert not r["meta"]["passed"] and r["meta"]["rejected_by"] == ["llm_judge"]

    def broken(body):  # the simulator's reply is prose: the model reads a failed call, the episode is rejected
        return completion({"content": "Sure! The note was saved."}) if role(body) == "simulator" else scripted(body)

    client = endpoint(broken)
    scripted.verdict = '{"passed": true, "reasons": []}'
    task = run(LLMTaskWriter(client)(NOTES, "single", 3, "notes"))
    r = run(trajectory(task, client, 0, judge="llm", llm_judge=LLMJudge(client), sim=client))
    assert not r["meta"]["passed"] and "simulator" in r["meta"]["rejected_by"], r["meta"]
    assert "the service gave no readable result" in r["messages"][3]["content"]
    with pytest.raises(ValueError, match="needs a simulator endpoint"):
        run(trajectory(task, client, 0, judge="rubric"))


def test_simulated_tools_check_arguments_and_apply_failure_rules_first():
    scripted = World()
    sim = SimulatedTools(endpoint(scripted), NOTES, seed=1, failures=[
        {"kind": "transient", "op": "get_note", "times": 1}, {"kind": "not_found", "op": "get_note",
                                                               "match": {"id": "N9"}, "message": "no such note"}])
    tools = {t.name: t for t in sim.tools()}
    from openk2.agent.tools import ToolError
    with pytest.raises(ToolError, match="invalid arguments for get_note"):
        run(tools["get_note"].run({"id": 5}))
    with pytest.raises(ToolError, match="temporarily unavailable"):
        run(tools["get_note"].run({"id": "N0"}))
    with pytest.raises(ToolError, match="no such note"):
        run(tools["get_note"].run({"id": "N9"}))
    assert "simulator" not in scripted.prompts  # none of these reached the endpoint
    assert json.loads(run(tools["create_note"].run({"text": "x"}))) == {"id": "N0"}
    with pytest.raises(ToolError, match="no note N7"):  # the simulator's own error reply
        run(tools["get_note"].run({"id": "N7"}))
    errors = [e.get("error", "") for e in sim.log]
    assert sim.problems == [] and [e.split()[0] for e in errors if e] == ["invalid", "get_note", "no", "no"]
    assert "result" in sim.log[3] and errors[3] == ""
    prompt = scripted.prompts["simulator"][-1]["messages"][-1]["content"]
    assert 'create_note({"text": "x"}) -> {"id": "N0"}' in prompt  # earlier calls and results are shown
    seeds = [b["seed"] for b in scripted.prompts["simulator"]]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError, match="bad failure rule"):
        SimulatedTools(None, NOTES, failures=[{"kind": "transient", "op": "delete_note"}])
    paged = SimulatedTools(endpoint(scripted), NOTES, failures=[{"kind": "partial", "op": "get_note", "limit": 2}])
    with pytest.raises(ToolError, match="no note N0"):  # a fresh session: the simulator knows no note
        run(paged.call("get_note", {"id": "N0"}))
    assert "at most 2 items" in scripted.prompts["simulator"][-1]["messages"][-1]["content"]


def test_parallel_calls_and_schemas_it_cannot_apply():
    scripted = World()
    sim = SimulatedTools(endpoint(scripted), NOTES)

    async def two():  # one turn's calls run at once: neither sees the other as a result
        return await asyncio.gather(sim.call("create_note", {"text": "a"}), sim.call("create_note", {"text": "b"}))

    assert run(two()) == [{"id": "N0"}, {"id": "N0"}]
    run(sim.call("create_note", {"text": "c"}))
    prompts = [b["messages"][-1]["content"] for b in scripted.prompts["simulator"]]
    assert all("null" not in p for p in prompts) and prompts[0].count("(none)") == 1
    assert 'create_note({"text": "a"}) -> {"id": "N0"}' in prompts[2] and '{"text": "b"}' in prompts[2]
    ref = [{"type": "function", "function": {"name": "create_note", "description": "", "parameters": {
        "type": "object", "properties": {"text": {"$ref": "#/definitions/missing"}}}}}]
    assert run(SimulatedTools(endpoint(scripted), ref).call("create_note", {"text": 5})) == {"id": "N0"}


@pytest.mark.parametrize("reply, reason", [
    ("Here is a task: save a note", "not one JSON object"),
    (json.dumps({"request": "Hi", "criteria": []}), "expected"),
    (json.dumps({"request": "Delete note N1", "tools": ["delete_note"], "criteria": ["deleted"]}), "not offered"),
    (json.dumps({"request": "What is 2+2?", "tools": [], "criteria": ["says 4"]}), "not a single task"),
    (400, None),
])
def test_the_task_writer_drops_unusable_tasks_with_why(reply, reason):
    def handler(body):
        if reply == 400:
            return httpx2.Response(400, json={"error": {"message": "bad model", "type": "invalid_request_error"}})
        return completion({"content": reply})

    tasks, dropped = write_tasks(LLMTaskWriter(endpoint(handler)), NOTES, 3, 0, ["single"], "notes")
    assert tasks == [] and sum(dropped.values()) == 3
    assert (reason or "the request failed") in next(iter(dropped)), dropped


def test_the_task_writer_samples_a_seeded_toolset_and_adds_the_failure():
    many = [{"type": "function", "function": {"name": f"t{i}", "description": "", "parameters": {
        "type": "object", "properties": {}}}} for i in range(10)]
    offered = []

    def handler(body):
        names = re.findall(r'"name": "(t\d+)"', body["messages"][-1]["content"])
        offered.append(names)
        return completion({"content": json.dumps({"request": "Run it", "tools": [names[0]], "criteria": ["ran"]})})

    writer = LLMTaskWriter(endpoint(handler), max_tools=4)
    a, b, c = (run(writer(many, "recovery", s, "x")) for s in (1, 1, 2))
    assert a == b and len(a.schemas) == 4 and a.tools == offered[0] and offered[0] != offered[2]
    assert a.failures == [{"kind": "transient", "op": a.needs[0], "times": 1}] and a.id == "x-recovery-1"
    assert OpenTask(**a.to_dict()) == a


def test_the_user_simulator_follows_up_then_ends():
    from openk2.agent.episode import Episode

    task = OpenTask("t", "multi_turn", "notes", 0, NOTES, ["Save a note saying: a", "Read it back."], "g", ["c"])
    replies = iter(["Read it back.", "DONE.", "more?"])
    user = LLMUser(endpoint(lambda body: completion({"content": next(replies)})), task)
    ep = Episode([{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.turns[0]},
                  {"role": "assistant", "content": "Saved."}], [])
    assert run(user(ep)) == "Read it back."
    assert run(user(ep)) is None  # DONE
    ep.append({"role": "user", "content": "x"})
    assert run(user(ep)) == "more?"  # as many user turns as planned: one more may follow (an answer)
    ep.append({"role": "user", "content": "y"})
    assert run(user(ep)) is None and user.problems == []  # past the planned turns and one more: it ends
    failing = LLMUser(endpoint(lambda body: httpx2.Response(400, json={"error": {"message": "down"}})), task)
    assert run(failing(Episode(ep.transcript[:3], []))) is None and "request failed" in failing.problems[0]


def test_tool_schemas_from_our_mcp_server_and_from_a_file(tmp_path):
    pytest.importorskip("mcp")
    openk2 = os.path.join(os.path.dirname(sys.executable), "openk2")
    (tmp_path / "ws").mkdir()
    schemas = run(mcp_tool_schemas([f"{openk2} mcp-server --workspace {tmp_path / 'ws'} --tools read_file,run_python"]))
    assert [s["function"]["name"] for s in schemas] == ["read_file", "run_python"]
    assert schemas[0]["function"]["parameters"]["required"] == ["path"] and schemas[0]["function"]["description"]
    (tmp_path / "t.json").write_text(json.dumps(schemas))
    assert read_tools_file(tmp_path / "t.json") == schemas
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match="tool 0 is not"):
        read_tools_file(tmp_path / "bad.json")
    for flags, message in [([], "give --teacher-endpoint"), (["--teacher-endpoint", "http://e/v1", "--judge", "rubric"],
                                                             "only the LLM judge"),
                           (["--teacher-endpoint", "http://e/v1", "--worlds", "bank"], "built-in worlds")]:
        with pytest.raises(SystemExit, match=message):
            cli(["synth", "--n", "1", "--out", str(tmp_path / "o.jsonl"), "--tools", str(tmp_path / "t.json"), *flags])


def test_the_roles_against_our_own_server():
    pytest.importorskip("uvicorn")
    from dataclasses import replace

    from test_server import serving

    from openk2.agent.client import OpenAIClient
    from openk2.config import PRESETS
    from openk2.model import build_model
    from openk2.server import create_app
    from openk2.tokenizer import Tokenizer

    model = build_model(replace(PRESETS["k2-tiny"], max_position_embeddings=4096), seed=0)
    with serving(create_app(model, Tokenizer.byte_level(), "k2-tiny")) as port:
        client = OpenAIClient(f"http://127.0.0.1:{port}/v1")
        tasks, dropped = write_tasks(LLMTaskWriter(client, max_tokens=8), NOTES, 1, 0, ["single"], "notes")
        sim = SimulatedTools(client, NOTES, max_tokens=8)
        from openk2.agent.tools import ToolError
        with pytest.raises(ToolError, match="no readable result"):
            run(sim.call("create_note", {"text": "x"}))
    assert tasks == [] and "not one JSON object" in next(iter(dropped))  # random weights: prose, said so
    assert sim.problems[0].startswith("simulator: create_note: not one JSON object")
    assert category(sim.problems[0]) == "simulator"


def test_a_missing_record_written_by_the_llm_fails_its_call_and_the_judge_is_told(tmp_path, monkeypatch):
    scripted, (record,) = synth_notes(tmp_path, monkeypatch, "missing")
    results = [m["content"] for m in record["messages"] if m["role"] == "tool"]
    assert record["meta"]["kind"] == "missing" and len(results) == 1 and "not found" in results[0]
    assert "simulator" not in scripted.prompts  # the injected failure answered, not the simulated backend
    judged = scripted.prompts["judge"][0]["messages"][-1]["content"]
    assert "after get_note finds nothing, the assistant says so and neither retries nor guesses" in judged
