"""The agent on real models: the in-process client over our Engine, the same conversation through the
HTTP server (identical replies), many episodes batched on one engine, a real `openk2 serve` process
with a forced tool call, and the `openk2 agent` command. `tool_model` (conftest.py) is a tiny model
trained here to do one file task, so a correct episode is known in advance."""

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import ANSWER, NOTES, SYSTEM, TASK  # noqa: E402
from test_server import serving  # noqa: E402

from openk2.agent.client import EngineClient, OpenAIClient  # noqa: E402
from openk2.agent.files import Workspace  # noqa: E402
from openk2.agent.runtime import Agent, Budget  # noqa: E402
from openk2.engine import Engine, EngineConfig  # noqa: E402
from openk2.server import create_app  # noqa: E402
from openk2.server.engine_loop import EngineLoop  # noqa: E402

FORCE = {"type": "function", "function": {"name": "read_file"}}


def engine_client(tm, engine=None):
    loop = EngineLoop(engine or Engine(tm.model, EngineConfig(cache_tokens=4096)))
    loop.start()
    return EngineClient(loop, tm.fmt, name="tool-model")


def file_agent(client, tm, **kw):
    tools = [t for t in Workspace(tm.workspace).tools() if t.name == "read_file"]
    return Agent(client, tools, system=SYSTEM, temperature=0, budget=Budget(turn_tokens=64), **kw)


def check_episode(ep):
    assert ep.stop_reason == "answered", ep.detail
    assert ep.final == ANSWER
    tool_msgs = [m for m in ep.transcript if m["role"] == "tool"]
    assert [(m["tool_call_id"], m["content"]) for m in tool_msgs] == [("functions.read_file:0", f"     1\t{NOTES}")]


def test_in_process_agent_does_the_task(tool_model):
    client = engine_client(tool_model)
    try:
        ep = asyncio.run(file_agent(client, tool_model).run(TASK))
    finally:
        client.loop.stop()
    check_episode(ep)
    assert ep.transcript[2]["tool_calls"][0]["function"]["arguments"] == '{"path": "notes.txt"}'
    assert ep.turns[0]["finish_reason"] == "tool_calls" and ep.turns[1]["finish_reason"] == "stop"


def test_strict_tools_leave_a_valid_episode_as_it_was(tool_model):
    """Constrained to the declared tool and its schema, the model's own (valid) calls go through
    unchanged: the same episode, token for token."""
    free, strict = engine_client(tool_model), engine_client(tool_model)
    strict.strict_tools = True
    try:
        eps = [asyncio.run(file_agent(c, tool_model).run(TASK)) for c in (free, strict)]
    finally:
        free.loop.stop(), strict.loop.stop()
    check_episode(eps[1])
    assert eps[1].transcript == eps[0].transcript


def test_in_process_replies_equal_the_servers(tool_model):
    """The same requests through EngineClient and through the HTTP server: the same messages, finish
    reasons and token counts (greedy and seeded sampling, tools auto and forced)."""
    (first, _), (second, _) = tool_model.dialog
    cases = [(first, None, 0.0, None), (first, FORCE, 0.0, None), (second, None, 0.0, None),
             (first, None, 1.0, 7), (second, None, 1.3, 11)]
    client = engine_client(tool_model)
    app = create_app(tool_model.model, tool_model.fmt.tokenizer, "tool-model")
    try:
        with serving(app) as port:
            http = OpenAIClient(f"http://127.0.0.1:{port}/v1", "tool-model")

            async def three(messages, choice, temperature, seed):  # in process; HTTP whole; HTTP streamed
                kw = dict(tool_choice=choice, max_tokens=48, temperature=temperature, seed=seed)
                return (await client.complete(messages, tool_model.tools, **kw),
                        await http.complete(messages, tool_model.tools, **kw),
                        await http.complete(messages, tool_model.tools, on_delta=lambda part, text: None, **kw))

            for case in cases:
                ours, *theirs = asyncio.run(three(*case))
                for other in theirs:
                    assert ours.message == other.message, case
                    assert (ours.finish_reason, ours.prompt_tokens, ours.completion_tokens) == \
                        (other.finish_reason, other.prompt_tokens, other.completion_tokens), case
                assert ours.prompt_ids[:ours.prompt_tokens] == ours.prompt_ids and len(ours.completion_ids) == \
                    ours.completion_tokens
            assert asyncio.run(http.complete(first, None, max_tokens=4)).finish_reason == "length"
            models = OpenAIClient(f"http://127.0.0.1:{port}/v1")  # name and context from /v1/models
            asyncio.run(models.complete(first, None, max_tokens=1))
            assert (models.name, models.context_window) == ("tool-model", 1024)
    finally:
        client.loop.stop()


def test_concurrent_episodes_share_the_engine_and_match_one_by_one(tool_model):
    engine = Engine(tool_model.model, EngineConfig(cache_tokens=8192))
    batch_sizes = []
    step = engine.step
    engine.step = lambda: (batch_sizes.append(len(engine.running)), step())[1]
    client = engine_client(tool_model, engine)

    async def many(n):
        return await asyncio.gather(*(file_agent(client, tool_model).run(TASK) for _ in range(n)))

    try:
        alone = asyncio.run(many(1))[0]
        batch_sizes.clear()
        together = asyncio.run(many(6))
    finally:
        client.loop.stop()
    assert max(batch_sizes) == 6  # all six episodes decoded in the same steps
    for ep in together:
        check_episode(ep)
        assert ep.transcript == alone.transcript


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_agent_against_a_real_openk2_serve_with_a_forced_call(tool_model):
    port = free_port()
    openk2 = os.path.join(os.path.dirname(sys.executable), "openk2")
    server = subprocess.Popen([openk2, "serve", str(tool_model.folder), "--port", str(port), "--no-compile"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = OpenAIClient(f"http://127.0.0.1:{port}/v1")
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(client._setup())
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        agent = file_agent(client, tool_model, tool_choice=lambda ep: FORCE if not ep.turns else "auto")
        ep = asyncio.run(agent.run(TASK))
    finally:
        server.terminate()
        server.wait(timeout=20)
    check_episode(ep)
    assert client.context_window == 1024


def test_openk2_agent_command_in_process(tool_model, tmp_path):
    trajectory = tmp_path / "t.jsonl"
    openk2 = os.path.join(os.path.dirname(sys.executable), "openk2")
    p = subprocess.run([openk2, "agent", str(tool_model.folder), "-p", TASK, "--system", SYSTEM,
                        "--tools", "read_file", "--workspace", str(tool_model.workspace), "--temperature", "0",
                        "--trajectory", str(trajectory)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ANSWER
    assert '→ read_file {"path": "notes.txt"}' in p.stderr and NOTES in p.stderr
    import json
    record = json.loads(trajectory.read_text())
    assert record["stop_reason"] == "answered" and record["usage"]["model_calls"] == 2


def test_openai_client_reads_streams_and_reasoning_as_endpoints_send_them():
    """vLLM-style replies: reasoning under `reasoning_content` (streamed) or `reasoning` (whole), a
    call's id and name in one chunk and its arguments in pieces, usage in the last chunk."""
    import json

    import httpx2

    def chunk(delta, finish=None, usage=None):
        body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return "data: " + json.dumps({**body, **({"usage": usage} if usage else {})}) + "\n\n"

    stream = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Look it "}),
              chunk({"reasoning_content": "up."}), chunk({"content": "Checking."}),
              chunk({"tool_calls": [{"index": 0, "id": "functions.f:0", "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
              chunk({"tool_calls": [{"index": 1, "id": "functions.g:1", "type": "function",
                                     "function": {"name": "g", "arguments": "{}"}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "tool_calls"),
              chunk(None, usage={"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}),
              "data: [DONE]\n\n"]
    whole = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "Hi.", "reasoning": "Say hi."}}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    seen = []

    def handler(request):
        body = json.loads(request.content)
        seen.append(body)
        if body.get("stream"):
            return httpx2.Response(200, text="".join(stream), headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=whole)

    client = OpenAIClient("http://endpoint/v1", "m", context_window=100,
                          http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    deltas = []
    streamed = asyncio.run(client.complete([{"role": "user", "content": "x"}], [{"type": "function"}],
                                           on_delta=lambda part, text: deltas.append((part, text))))
    f = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    g = {"id": "functions.g:1", "type": "function", "function": {"name": "g", "arguments": "{}"}}
    assert streamed.message == {"role": "assistant", "content": "Checking.", "reasoning_content": "Look it up.",
                                "tool_calls": [f, g]}
    assert (streamed.finish_reason, streamed.prompt_tokens, streamed.completion_tokens) == ("tool_calls", 7, 5)
    assert deltas == [("reasoning", "Look it "), ("reasoning", "up."), ("content", "Checking.")]
    assert seen[0]["stream_options"] == {"include_usage": True} and seen[0]["model"] == "m"
    whole_reply = asyncio.run(client.complete([{"role": "user", "content": "x"}], temperature=0.5, max_tokens=9))
    assert whole_reply.message == {"role": "assistant", "content": "Hi.", "reasoning_content": "Say hi."}
    assert seen[1]["temperature"] == 0.5 and seen[1]["max_tokens"] == 9 and "tools" not in seen[1]
    client.strict_tools = True  # --strict-tools: the endpoint gets each tool marked strict
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    asyncio.run(client.complete([{"role": "user", "content": "x"}], [tool]))
    assert seen[2]["tools"] == [{"type": "function", "function": {**tool["function"], "strict": True}}]
    assert "strict" not in tool["function"]  # the caller's declaration is left alone
