"""The agent loop, driven exactly by a scripted model: turns written as K2 writes them (tool-call
markers), rendered and parsed through the real template and parser. Every loop path: parallel calls,
unknown tools, invalid arguments, tool errors and timeouts, approvals, budgets, sub-agents, compaction,
reasoning, follow-ups, trajectories. The tool decorator and the workspace file tools."""

import asyncio
import json
import os
import time
from typing import Annotated, Literal

import pytest

from openk2.agent.client import ScriptedClient
from openk2.agent.compact import SUMMARY_HEADER, SUMMARY_SYSTEM, split
from openk2.agent.files import Workspace
from openk2.agent.episode import Episode, write_jsonl
from openk2.agent.runtime import UNPARSED, Agent, Budget
from openk2.agent.subagents import SUBAGENT_SYSTEM, task_tool
from openk2.agent.tools import ArgumentError, ToolContext, ToolError, tool
from openk2.tokenizer import render_chat
from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END


def call(name: str, index: int, args) -> str:
    args = args if isinstance(args, str) else json.dumps(args)
    return CALL_BEGIN + f"functions.{name}:{index}" + ARGUMENT_BEGIN + args + CALL_END


def calls(*blocks: str, text: str = "") -> str:
    return text + SECTION_BEGIN + "".join(blocks) + SECTION_END


def run(agent: Agent, task="go"):
    return asyncio.run(agent.run(task))


@tool
async def slow_echo(text: str, seconds: float = 0.0) -> str:
    """Echo `text` after sleeping `seconds`."""
    await asyncio.sleep(seconds)
    return f"echo:{text}"


@tool
def boom() -> str:
    """Always fails."""
    raise RuntimeError("the disk is on fire")


@tool(timeout=0.2)
async def hang() -> str:
    """Never returns."""
    await asyncio.sleep(60)


@tool(needs_approval=True)
def dangerous(what: str) -> str:
    """Does something that needs approval."""
    return f"did {what}"


def results(ep: Episode) -> list[dict]:
    return [m for m in ep.transcript if m["role"] == "tool"]


def interrupted(agent: Agent, after: float) -> Episode:
    """The episode of `agent` on "go", its task cancelled after `after` seconds (Ctrl-C)."""
    ep = agent.episode("go")

    async def interrupt():
        task = asyncio.create_task(agent.resume(ep))
        await asyncio.sleep(after)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupt())
    return ep


# ---------------------------------------------------------------- the loop

def test_parallel_calls_run_concurrently_and_answer_in_call_order():
    slow = {"seconds": 1.0}
    script = [calls(call("slow_echo", 0, {"text": "a", **slow}), call("slow_echo", 1, {"text": "b", **slow}),
                    call("slow_echo", 2, {"text": "c"}), text="Three at once."),
              "All done."]
    client = ScriptedClient(script)
    finished = []
    agent = Agent(client, [slow_echo],
                  on_event=lambda kind, data: finished.append(data["call"]["id"]) if kind == "result" else None)
    start = time.monotonic()
    ep = run(agent)
    assert time.monotonic() - start < 1.8  # 1 s + 1 s + 0 run side by side (one after the other: 2 s)
    assert finished[0] == "functions.slow_echo:2"  # the quick one finished first ...
    assert [(m["tool_call_id"], m["content"]) for m in results(ep)] == [  # ... its result is still third
        ("functions.slow_echo:0", "echo:a"), ("functions.slow_echo:1", "echo:b"), ("functions.slow_echo:2", "echo:c")]
    assert ep.stop_reason == "answered" and ep.final == "All done."
    # the second request carried the whole turn back, in K2's rendering of ids and results
    prompt = render_chat(client.requests[1]["messages"], client.requests[1]["tools"])
    assert "## Return of functions.slow_echo:1\necho:b" in prompt
    assert client.requests[1]["prompt_ids"] == client.fmt.tokenizer.encode(prompt, allow_special=True)


def test_an_argument_error_names_the_arguments():
    from openk2.agent.tools import Tool
    def made(parameters):
        return Tool("t", "", parameters, None)
    assert made({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["b"]}).arguments_hint() == \
        "a, b (required)"
    assert made({"type": "object", "properties": {}}).arguments_hint() == "none"
    assert made({"type": "object"}).arguments_hint() == "none"
    assert made({}).arguments_hint() == ""  # a schema that names nothing: no hint


def test_tool_failures_go_back_to_the_model_and_the_loop_goes_on():
    bad_json = {"content": None, "tool_calls": [  # an endpoint that returns raw arguments (as vLLM does)
        {"id": "functions.slow_echo:3", "type": "function",
         "function": {"name": "slow_echo", "arguments": '{"text": '}},
        {"id": "functions.slow_echo:4", "type": "function", "function": {"name": "slow_echo", "arguments": "[1]"}}]}
    script = [calls(call("nope", 0, {}), call("boom", 1, {}), call("slow_echo", 2, {"text": 5})), bad_json,
              calls(call("hang", 5, {})), "Recovered."]
    ep = run(Agent(ScriptedClient(script), [slow_echo, boom, hang]))
    texts = [m["content"] for m in results(ep)]
    assert texts[0].startswith("Error: there is no tool named 'nope'; the tools are: slow_echo, boom, hang")
    assert texts[1] == "Error: boom failed: RuntimeError: the disk is on fire"
    # an argument error says what to send (as the unknown tool's error lists the tools)
    hint = "; the arguments are: text (required), seconds."
    assert texts[2] == "Error: invalid arguments for slow_echo: text: 5 is not of type 'string'" + hint
    assert texts[3].startswith("Error: invalid arguments for slow_echo: not valid JSON") and texts[3].endswith(hint)
    assert texts[4] == "Error: invalid arguments for slow_echo: the arguments must be a JSON object" + hint
    assert texts[5] == "Error: hang timed out after 0.2 s."
    assert [e["kind"] for e in ep.tool_errors] == ["unknown_tool", "tool_error", "invalid_arguments",
                                                   "invalid_arguments", "invalid_arguments", "timeout"]
    assert ep.stop_reason == "answered" and ep.final == "Recovered."


def test_a_call_the_parser_drops_is_reported_back():
    script = [calls(call("slow_echo", "x", {"text": "y"}), text="Trying."), calls(call("slow_echo", 1, {"text": "x"})),
              "ok"]
    client = ScriptedClient(script)
    ep = run(Agent(client, [slow_echo]))
    assert ep.transcript[2]["role"] == "system"
    assert ep.transcript[2]["content"].startswith(UNPARSED.split("(")[0])
    assert "malformed id 'functions.slow_echo:x'" in ep.transcript[2]["content"]
    assert ep.tool_errors[0]["kind"] == "unparsed_call"
    assert results(ep)[0]["content"] == "echo:x" and ep.stop_reason == "answered"


def test_a_call_with_invalid_json_reaches_the_loop_as_written():
    script = [calls(call("slow_echo", 0, '{"text": "cut')), "ok"]
    ep = run(Agent(ScriptedClient(script), [slow_echo]))
    assert ep.transcript[1]["tool_calls"][0]["function"]["arguments"] == '{"text": "cut'
    assert results(ep)[0]["content"].startswith("Error: invalid arguments for slow_echo: not valid JSON")
    assert [e["kind"] for e in ep.tool_errors] == ["invalid_arguments"] and ep.stop_reason == "answered"


def test_approval_asked_only_for_tools_that_need_it():
    asked = []

    async def approve(name, args):
        asked.append((name, args))
        return args["what"] == "good"

    script = [calls(call("dangerous", 0, {"what": "good"}), call("dangerous", 1, {"what": "bad"}),
                    call("slow_echo", 2, {"text": "t"})), "ok"]
    ep = run(Agent(ScriptedClient(script), [dangerous, slow_echo], approve=approve))
    assert sorted((n, a["what"]) for n, a in asked) == [("dangerous", "bad"), ("dangerous", "good")]
    assert [m["content"] for m in results(ep)] == ["did good", "Error: the user declined this call.", "echo:t"]
    assert ep.tool_errors[0]["kind"] == "declined"


@pytest.mark.parametrize("budget, reason", [
    (Budget(max_turns=2), "max_turns"),
    (Budget(max_tokens=30, turn_tokens=1000), "max_tokens"),
    (Budget(max_seconds=0.5), "wall_time"),
    (Budget(turn_tokens=5), "length"),
])
def test_budgets_stop_with_their_reason(budget, reason):
    loop = calls(call("slow_echo", 0, {"text": "again", "seconds": 0.3}))
    script = [loop] * 20 if reason != "length" else ["a long answer that does not fit"]
    ep = run(Agent(ScriptedClient(script), [slow_echo], budget=budget))
    assert ep.stop_reason == reason, ep.detail
    if reason == "max_turns":
        assert len(ep.turns) == 2
    if reason == "max_tokens":
        assert ep.completion_tokens >= 30 > ep.completion_tokens - ep.turns[-1]["completion_tokens"]
    if reason == "wall_time":
        assert 0.5 <= ep.seconds < 2.0  # stopped at the first check past the budget (turns of ~0.3 s)


def test_model_errors_and_cancellation_end_the_episode():
    ep = run(Agent(ScriptedClient([calls(call("slow_echo", 0, {"text": "x"}))]), [slow_echo]))
    assert ep.stop_reason == "model_error" and "no more turns" in ep.detail

    agent = Agent(ScriptedClient([calls(call("slow_echo", 0, {"text": "x", "seconds": 5}))]), [slow_echo])
    ep = interrupted(agent, 0.2)
    assert ep.stop_reason == "cancelled"


def test_user_simulator_follow_ups_and_tool_choice_per_turn():
    follow = iter(["And now?", None])

    async def user(ep):
        return next(follow)

    choice = {"type": "function", "function": {"name": "slow_echo"}}
    forced = SECTION_BEGIN + CALL_BEGIN + "functions.slow_echo:0" + ARGUMENT_BEGIN
    client = ScriptedClient([forced + '{"text": "hi"}' + CALL_END + SECTION_END, "first answer", "second answer"])
    ep = run(Agent(client, [slow_echo], user=user, tool_choice=lambda ep: choice if not ep.turns else "auto"))
    assert [r["tool_choice"] for r in client.requests] == [choice, "auto", "auto"]
    assert [m["content"] for m in ep.transcript if m["role"] == "user"] == ["go", "And now?"]
    assert ep.final == "second answer" and results(ep)[0]["content"] == "echo:hi"


def test_reasoning_is_kept_and_sent_back():
    thought = {"content": calls(call("slow_echo", 0, {"text": "r"})), "reasoning_content": "I should echo."}
    client = ScriptedClient([thought, "done"])
    ep = run(Agent(client, [slow_echo]))
    sent = client.requests[1]["messages"][1]
    assert sent["reasoning_content"] == "I should echo." and sent["tool_calls"][0]["id"] == "functions.slow_echo:0"
    assert ep.transcript[1]["reasoning_content"] == "I should echo."
    # a Thinking-style template reads it back from the message, as K2-Thinking's does (K2-SPEC §6.1)
    thinking = ("{% for m in messages %}{% if m.role == 'assistant' %}<think>{{ m.reasoning_content }}</think>"
                "{% endif %}{% endfor %}")
    assert render_chat(client.requests[1]["messages"], template=thinking) == "<think>I should echo.</think>"


def test_subagents_run_in_parallel_with_their_own_context_and_tools():
    sub_turn = calls(call("slow_echo", 0, {"text": "sub", "seconds": 1.0}))

    def sub_answer(messages, tools):  # each sub-agent answers with what its prompt asked for
        assert [t["function"]["name"] for t in tools] == ["slow_echo"]  # its subset; no `task` at depth 1
        assert messages[0] == {"role": "system", "content": SUBAGENT_SYSTEM}
        return f"answer to {messages[1]['content']}"

    script = [calls(call("task", 0, {"prompt": "job A", "tools": ["slow_echo"]}),
                    call("task", 1, {"prompt": "job B", "tools": ["slow_echo"]})),
              sub_turn, sub_turn, sub_answer, sub_answer, "both done"]
    client = ScriptedClient(script)
    start = time.monotonic()
    ep = run(Agent(client, [slow_echo, task_tool()]))
    assert time.monotonic() - start < 1.8  # the two sub-agents' 1 s tools overlapped
    assert sorted(m["content"] for m in results(ep)) == ["answer to job A", "answer to job B"]
    assert sorted(s["tool_call_id"] for s in ep.subagents) == ["functions.task:0", "functions.task:1"]
    assert all(s["stop_reason"] == "answered" and s["messages"][1]["role"] == "user" for s in ep.subagents)
    assert ep.final == "both done"
    with pytest.raises(ArgumentError, match="unknown tools"):
        Agent(client, [slow_echo]).subagent(["missing"])


def test_compaction_summarises_old_turns_and_keeps_what_must_stay():
    @tool
    def pad(n: int) -> str:
        """Returns n characters."""
        return "x" * n

    summaries, made = [], []

    def model(messages, tools):  # six calls, then an answer; a summary whenever asked for one
        if messages[0]["content"] == SUMMARY_SYSTEM:
            assert tools is None
            summaries.append(messages[1]["content"])
            return "The agent padded six times."
        made.append(len(made))
        return calls(call("pad", made[-1], {"n": 300})) if made[-1] < 6 else "finished"

    client = ScriptedClient([model] * 20, context_window=2600)
    ep = run(Agent(client, [pad], system="Be brief.", keep_recent=2, budget=Budget(turn_tokens=200)))
    assert ep.stop_reason == "answered" and ep.final == "finished" and len(ep.compactions) == 1
    compaction = ep.compactions[0]
    assert compaction["tokens_after"] < compaction["tokens_before"] and compaction["replaced"] > 0
    assert all(client.count_tokens(r["messages"], r["tools"]) < 2600 for r in client.requests)
    at = next(i for i, r in enumerate(client.requests) if r["tools"] is None)
    after = client.requests[at + 1]["messages"]
    assert client.count_tokens(after, client.requests[0]["tools"]) < 0.75 * 2600
    assert after[0] == {"role": "system", "content": "Be brief."} and after[1] == {"role": "user", "content": "go"}
    assert after[2]["content"] == SUMMARY_HEADER + "The agent padded six times."
    last = ep.transcript.index(after[3])  # the recent turn, whole: the latest call and its result
    assert len(after) == 5 and after[3:] == ep.transcript[last:last + 2] and after[4]["role"] == "tool"
    assert "pad" in summaries[0] and "tool pad: xxx" in summaries[0]
    assert len(ep.transcript) == 2 + 2 * 6 + 1  # the transcript never loses anything
    assert [t["kind"] for t in ep.turns].count("compaction") == 1


def test_split_never_parts_a_call_from_its_result_nor_drops_an_unanswered_call():
    a = lambda i: {"role": "assistant", "content": None, "tool_calls": [  # noqa: E731
        {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    t = lambda i: {"role": "tool", "tool_call_id": f"c{i}", "content": "r"}  # noqa: E731
    ctx = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}, a(0), t(0), a(1), t(1), a(2), t(2)]
    head, old, recent = split(ctx, keep_recent=1)  # the last message alone would be an orphan result
    assert head == ctx[:2] and old == ctx[2:6] and recent == ctx[6:]
    ctx_open = ctx[:4] + [a(1)] + ctx[6:]  # c1 never got a result
    head, old, recent = split(ctx_open, keep_recent=2)
    assert old == ctx_open[2:4] and recent[0] == a(1)


def test_context_overflow_stops_when_compaction_cannot_help():
    @tool
    def flood() -> str:
        """Returns more text than the context holds."""
        return "y" * 3000

    ep = run(Agent(ScriptedClient([calls(call("flood", 0, {}))], context_window=2000), [flood],
                   budget=Budget(turn_tokens=100)))
    assert ep.stop_reason == "context_length" and "context is 2000" in ep.detail


def test_trajectory_record_is_one_jsonl_line(tmp_path):
    ep = run(Agent(ScriptedClient([calls(call("boom", 0, {})), "sorry"]), [boom]))
    path = tmp_path / "runs" / "t.jsonl"
    write_jsonl(path, [ep.record(), ep.record()])
    lines = path.read_text().splitlines()
    rec = json.loads(lines[0])
    assert len(lines) == 2 and rec["stop_reason"] == "answered" and rec["final"] == "sorry"
    assert rec["messages"][0] == {"role": "user", "content": "go"} and rec["tools"][0]["function"]["name"] == "boom"
    assert rec["usage"]["model_calls"] == 2 and rec["usage"]["prompt_tokens"] > 0
    assert rec["tool_errors"][0]["kind"] == "tool_error" and set(rec["timings"]) == {"total_s", "model_s", "tools_s"}


# ---------------------------------------------------------------- tools

def test_tool_schema_from_hints_and_docstring():
    @tool
    def lookup(city: str, unit: Literal["c", "f"] = "c", days: Annotated[int, "how many days"] = 1,
               tags: list[str] | None = None, ctx: ToolContext = None) -> dict:
        """Weather of a city.

        Args:
            city: the city's name,
                with its country if ambiguous
            unit: temperature unit
        Returns:
            a forecast
        """
        return {"city": city, "context": ctx is not None}

    fn = lookup.schema()["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Weather of a city."
    assert fn["parameters"] == {"type": "object", "additionalProperties": False, "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city's name, with its country if ambiguous"},
        "unit": {"enum": ["c", "f"], "description": "temperature unit", "default": "c"},
        "days": {"type": "integer", "description": "how many days", "default": 1},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}}}}
    assert asyncio.run(lookup.invoke({"city": "Oslo", "tags": None}, ToolContext(None, None))) == \
        '{"city": "Oslo", "context": true}'
    assert asyncio.run(lookup.invoke({"city": "Oslo"}, ToolContext(None, None))) == '{"city": "Oslo", "context": true}'
    for bad, message in [({"city": 1}, "city: 1 is not of type"), ({}, "'city' is a required property"),
                         ({"city": "a", "x": 1}, "Additional properties"),
                         ({"city": "a", "unit": "k"}, "is not one of")]:
        with pytest.raises(ArgumentError, match=message):
            asyncio.run(lookup.invoke(bad))
    with pytest.raises(TypeError, match="no JSON schema"):
        @tool
        def odd(x: object) -> str:
            """An unsupported parameter type."""


def test_workspace_tools_stay_inside(tmp_path):
    ws_dir = tmp_path / "ws"
    (ws_dir / "pkg").mkdir(parents=True)
    (ws_dir / "pkg" / "a.py").write_text("def f():\n    return 1\n")
    (ws_dir / ".git").mkdir()
    (ws_dir / ".git" / "config").write_text("def hidden")
    (tmp_path / "secret.txt").write_text("secret")
    (ws_dir / "link").symlink_to(tmp_path / "secret.txt")
    tools = {t.name: t for t in Workspace(ws_dir).tools()}
    go = lambda name, **a: asyncio.run(tools[name].invoke(a))  # noqa: E731
    assert go("read_file", path="pkg/a.py") == "     1\tdef f():\n     2\t    return 1"
    assert go("write_file", path="new/b.txt", content="hi\n") == "wrote 3 bytes to new/b.txt"
    assert go("edit_file", path="pkg/a.py", old="return 1", new="return 2") == "edited pkg/a.py"
    assert "return 2" in (ws_dir / "pkg" / "a.py").read_text()
    assert go("list_files") == "new/b.txt  (3 bytes)\npkg/a.py  (22 bytes)"  # not the link out, not .git
    assert "pkg/a.py" in go("list_files", pattern="*.py") and ".git" not in go("list_files")
    assert go("search_files", regex=r"def \w+") == "pkg/a.py:1: def f():"
    with pytest.raises(Exception, match="unterminated|missing"):
        go("search_files", regex="(")
    for path in ["../secret.txt", str(tmp_path / "secret.txt"), "link", "/etc/passwd"]:
        with pytest.raises(PermissionError, match="outside the workspace"):
            go("read_file", path=path)
    with pytest.raises(PermissionError):
        go("write_file", path="../escape.txt", content="x")
    with pytest.raises(ToolError, match="occurs 0 times"):
        go("edit_file", path="pkg/a.py", old="nothing", new="x")
    os.mkfifo(ws_dir / "pipe")  # what sandboxed code could leave: reading it would block a thread for good
    (ws_dir / "blob.bin").write_bytes(b"\x00\x01" * 5000)
    for path, message in [("pipe", "pipe is not a regular file"), ("pkg", "Is a directory|not a regular"),
                          ("blob.bin", "blob.bin is a binary file")]:
        with pytest.raises((ToolError, OSError), match=message):
            go("read_file", path=path)
    with pytest.raises(OSError):
        go("write_file", path="pipe", content="x")
    assert not (tmp_path / "escape.txt").exists()
    assert tools["write_file"].needs_approval and not tools["read_file"].needs_approval


def test_a_search_that_backtracks_badly_is_stopped_and_the_loop_stays_responsive(tmp_path, monkeypatch):
    import openk2.agent.search as search_module
    monkeypatch.setattr(search_module, "SEARCH_SECONDS", 1.0)
    (tmp_path / "evil.txt").write_text("a" * 40 + "b\n")
    search = {t.name: t for t in Workspace(tmp_path).tools()}["search_files"]
    ticks = []

    async def main():
        async def tick():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        ticker = asyncio.create_task(tick())
        try:
            with pytest.raises(ToolError, match="ran past 1 s"):
                await search.invoke({"regex": "(a+)+$"})
        finally:
            ticker.cancel()

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 5 and len(ticks) >= 10  # the event loop kept running meanwhile


# ---------------------------------------------------------------- review: edges of the loop and the terminal

def test_reply_room_subagent_time_and_tokens_result_cap_and_message_shape():
    from openk2.agent.client import clean_message
    no_calls = {"role": "assistant", "content": "x", "tool_calls": []}  # OpenAI itself refuses an empty list
    assert clean_message(no_calls) == {"role": "assistant", "content": "x"}
    dict_args = {"id": "i", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}
    assert clean_message({"role": "assistant", "tool_calls": [dict_args]})["tool_calls"][0]["function"] == \
        {"name": "f", "arguments": '{"a": 1}'}

    client = ScriptedClient(["short answer"], context_window=600)  # never ask for more than the context has left
    run(Agent(client, [slow_echo], budget=Budget(turn_tokens=4096)))
    assert client.requests[0]["max_tokens"] == 600 - len(client.requests[0]["prompt_ids"])

    @tool
    def flood() -> str:
        """A lot of text."""
        return "z" * 100_000

    ep = run(Agent(ScriptedClient([calls(call("flood", 0, {})), "ok"]), [flood], budget=Budget(max_result_chars=1000)))
    assert results(ep)[0]["content"] == "z" * 1000 + "\n[… 99000 more characters cut]"

    sub_turn = calls(call("slow_echo", 0, {"text": "s", "seconds": 0.4}))  # the sub-agent outlives tool_timeout
    script = [calls(call("task", 0, {"prompt": "p"})), sub_turn, sub_turn, "sub done", "parent done"]
    ep = run(Agent(ScriptedClient(script), [slow_echo, task_tool()], budget=Budget(tool_timeout=0.5)))
    assert results(ep)[0]["content"] == "sub done" and ep.final == "parent done"
    sub = ep.turns[1]
    assert sub["kind"] == "subagent" and sub["model_calls"] == 3 and sub["completion_tokens"] > 0
    assert ep.record()["usage"]["model_calls"] == 5 and ep.completion_tokens > sum(
        t["completion_tokens"] for t in ep.turns if t["kind"] == "turn")


def test_subagent_edges_and_split_with_nothing_recent():
    script = [calls(call("task", 0, {"prompt": "p", "tools": []})), "no tools needed", "done"]
    client = ScriptedClient(script)
    ep = run(Agent(client, [slow_echo, task_tool()]))
    assert client.requests[1]["tools"] is None and results(ep)[0]["content"] == "no tools needed"
    ep = run(Agent(ScriptedClient([calls(call("task", 0, {"prompt": "p"})), "done"]), [task_tool()], max_depth=0))
    assert results(ep)[0]["content"] == "Error: sub-agents may nest 0 level(s) deep"
    ctx = [{"role": "user", "content": "t"}, {"role": "assistant", "content": "a"}]
    assert split(ctx, keep_recent=0) == (ctx[:1], ctx[1:], [])


def test_cancelled_subagent_is_still_recorded():
    agent = Agent(ScriptedClient([calls(call("task", 0, {"prompt": "p"})),
                                  calls(call("slow_echo", 0, {"text": "s", "seconds": 5}))]), [slow_echo, task_tool()])
    ep = interrupted(agent, 0.3)
    assert ep.stop_reason == "cancelled" and ep.subagents[0]["stop_reason"] == "cancelled"
    assert results(ep)[0]["content"] == "Error: interrupted by the user."


def test_keyboard_gives_a_line_typed_after_an_abandoned_prompt_to_the_next_one():
    import io
    import queue

    from openk2.agent.terminal import Keyboard, View, printable
    lines, prompts = queue.Queue(), []

    def fake_input(prompt):
        prompts.append(prompt)
        return lines.get()

    keyboard = Keyboard(fake_input, out=io.StringIO())

    async def main():
        first = asyncio.create_task(keyboard.ask("allow? "))
        await asyncio.sleep(0.05)
        first.cancel()  # Ctrl-C during an approval prompt
        lines.put("next task")
        return await keyboard.ask("you> ")

    assert asyncio.run(main()) == "next task" and prompts == ["allow? "]  # one read, not two
    assert printable("ls\r\x1b[2Krm -rf x\tok\n") == "ls\\r\\x1b[2Krm -rf x\tok\n"
    view = View(io.StringIO(), Keyboard(lambda prompt: "n", out=io.StringIO()))
    assert not asyncio.run(view.approve("run_shell", {"command": "echo \x1b[2Khi"}))
    assert "echo \\x1b[2Khi" in view.out.getvalue()
