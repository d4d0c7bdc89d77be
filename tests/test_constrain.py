"""Constrained decoding (server/constrain.py + the engine's mask): with a random tiny model, every forced
call parses to calls of declared tools with the dialog's running ids and arguments valid under their
schemas, every response_format reply is JSON under its schema, for greedy and sampled rows batched
together; requests without a grammar decode exactly as before; bad schemas and combinations are 400s."""

import dataclasses
import json

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from openk2.config import PRESETS  # noqa: E402
from openk2.engine import Engine, EngineConfig  # noqa: E402
from openk2.engine.sampler import allowed_NV, apply_mask  # noqa: E402
from openk2.model import build_model  # noqa: E402
from openk2.server import constrain  # noqa: E402
from openk2.server.chat_format import ChatError, ChatFormat  # noqa: E402

# short names and bounded values: a random model's byte-level calls end within a few dozen tokens
WEATHER = {"type": "object", "properties": {"c": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                                            "d": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "u": {"enum": ["c", "f"]}},
           "required": ["c", "d"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"z": {"enum": ["utc", "cet"]}}, "required": ["z"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "wx", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "tm", "parameters": TIME}}]
SCHEMAS = {"wx": WEATHER, "tm": TIME}
PERSON = {"type": "object", "properties": {"n": {"type": "string", "pattern": "^[a-z]{1,4}$"},
                                           "a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "p": {"type": "array", "items": {"enum": ["cat", "dog"]},
                                                 "maxItems": 2}},
          "required": ["n", "a", "p"], "additionalProperties": False}
PAST = {"id": "functions.tm:{}", "type": "function", "function": {"name": "tm", "arguments": '{"z": "utc"}'}}
# a dialog with two calls behind it: the next call's id index is 2 (K2-SPEC §6.2)
DIALOG = [{"role": "user", "content": "Time?"},
          {"role": "assistant", "content": None,
           "tool_calls": [{**PAST, "id": PAST["id"].format(i)} for i in range(2)]},
          *[{"role": "tool", "tool_call_id": PAST["id"].format(i), "content": "12:00"} for i in range(2)],
          {"role": "user", "content": "Weather in Paris?"}]
ROWS = [(0.0, None), (1.0, 1), (0.7, 2)]  # (temperature, seed): greedy and sampled, one batch


@pytest.fixture(scope="module")
def fmt_model():
    cfg = dataclasses.replace(PRESETS["k2-tiny"], num_hidden_layers=2, max_position_embeddings=2048)
    model = build_model(cfg, seed=0)
    return ChatFormat.for_model(model), model


def run_rows(fmt, model, prompt, rows=ROWS, max_tokens=300, compile=False, extra=()):
    """Decode `rows` of `prompt` together in one engine (plus `extra` unconstrained prompts); the replies."""
    engine = Engine(model, EngineConfig(cache_tokens=16384, compile=compile))
    reqs = [engine.add_request(prompt.ids, fmt.sampling(len(prompt.ids), t, None, max_tokens, s,
                                                        grammar=prompt.grammar)) for t, s in rows]
    plain = [engine.add_request(ids, fmt.sampling(len(ids), 0.0, None, 24)) for ids in extra]
    engine.run()
    replies = [fmt.reply(fmt.tokenizer.decode(r.output), prompt, r.finish_reason) for r in reqs]
    return replies, reqs, plain


def check_calls(reply, first: int, names=None):
    assert reply.finish_reason == "tool_calls" and not reply.errors, reply
    calls = reply.message["tool_calls"]
    assert calls and reply.message["content"] is None
    for k, call in enumerate(calls):
        name = call["function"]["name"]
        assert name in (names or SCHEMAS) and call["id"] == f"functions.{name}:{first + k}"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    return calls


def test_forced_calls_are_valid_with_running_ids(fmt_model, monkeypatch):
    """"required" (parallel or not) and a named function, greedy and sampled rows, all in one batch."""
    monkeypatch.setattr(constrain, "MAX_CALLS", 3)  # fewer rules, shorter replies
    fmt, model = fmt_model
    named = {"type": "function", "function": {"name": "wx"}}
    prompts = {"parallel": fmt.prompt(DIALOG, TOOLS, "required"),
               "single": fmt.prompt(DIALOG, TOOLS, "required", parallel_tool_calls=False),
               "named": fmt.prompt(DIALOG, TOOLS, named)}
    engine, reqs = Engine(model, EngineConfig(cache_tokens=16384)), []
    for kind, prompt in prompts.items():
        for t, s in ROWS:
            params = fmt.sampling(len(prompt.ids), t, None, 300, s, grammar=prompt.grammar)
            reqs.append((kind, prompt, engine.add_request(prompt.ids, params)))
    engine.run()
    for kind, prompt, req in reqs:
        assert req.finish_reason == "stop"  # ended by the grammar, not by max_tokens
        reply = fmt.reply(fmt.tokenizer.decode(req.output), prompt, req.finish_reason)
        calls = check_calls(reply, first=2, names=["wx"] if kind == "named" else None)
        assert len(calls) <= {"parallel": 3, "single": 1, "named": 1}[kind]
        if kind == "named":
            assert fmt.tokenizer.decode(req.output[-2:]) == "<|tool_call_end|><|tool_calls_section_end|>"
    assert max(len(check_calls(fmt.reply(fmt.tokenizer.decode(r.output), p, "stop"), 2)) for k, p, r in reqs
               if k == "parallel") > 1  # parallel calls were made, ids counting on


def test_json_schema_reply(fmt_model):
    fmt, model = fmt_model
    fmt_json = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    prompt = fmt.prompt([{"role": "user", "content": "Describe someone."}], response_format=fmt_json)
    replies, _, _ = run_rows(fmt, model, prompt)
    for reply in replies:
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.message["content"]), PERSON)


def accepts(fmt, grammar, text: str) -> bool:
    """Whether `grammar` lets every token of `text` through, one at a time, as the engine would ask."""
    matcher, row = grammar.start(), torch.zeros(-(-fmt.vocab_size // 32), dtype=torch.int32)
    for tok in fmt.tokenizer.encode(text, allow_special=True):
        matcher.fill(row)
        if not (int(row[tok // 32]) >> (tok % 32)) & 1:
            return False
        matcher.advance(tok)
    return True


def test_json_object_grammar(fmt_model):
    """Any JSON object, in K2's spacing; the grammar is complete at its last brace. (A random model
    writes objects without end, so this one is checked on texts, not on generations.)"""
    fmt, _ = fmt_model
    grammar = fmt.prompt([{"role": "user", "content": "hi"}], response_format={"type": "json_object"}).grammar
    assert accepts(fmt, grammar, '{"a": [1, {"b": null}], "c": "d"}')
    for bad in ('[1, 2]', '{"a":1}', '{"a": 1} ', 'text'):
        assert not accepts(fmt, grammar, bad), bad
    matcher = grammar.start()
    for tok in fmt.tokenizer.encode('{"a": 1}'):
        assert not matcher.done
        matcher.advance(tok)
    assert matcher.done


def reference_greedy(fmt, model, prompt, n: int) -> list[int]:
    """Greedy constrained decoding the slow way: the whole sequence through the model for every token,
    the grammar's allowed ids read bit by bit, argmax over them."""
    matcher, out, width = prompt.grammar.start(), [], -(-model.cfg.vocab_size // 32)
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt.ids + out]))[0, -1].float()
        row = torch.zeros(width, dtype=torch.int32)
        matcher.fill(row)
        allowed = [v for v in range(model.cfg.vocab_size) if (int(row[v // 32]) >> (v % 32)) & 1]
        out.append(max(allowed, key=lambda v: logits[v].item()))
        matcher.advance(out[-1])
        if matcher.done or out[-1] in fmt.stop_ids:
            break
    return out


def test_greedy_matches_reference_and_plain_rows_are_unchanged(fmt_model):
    fmt, model = fmt_model
    prompt = fmt.prompt(DIALOG, TOOLS, "required")
    plain = [fmt.prompt([{"role": "user", "content": "Hello"}]).ids, prompt.ids]
    alone = run_rows(fmt, model, prompt, rows=[], extra=plain)[2]
    replies, (greedy, *_), mixed = run_rows(fmt, model, prompt, extra=plain)
    assert [r.output for r in mixed] == [r.output for r in alone]  # the grammar rows leave others alone
    assert greedy.output == reference_greedy(fmt, model, prompt, len(greedy.output) + 1)


@pytest.mark.slow
def test_compiled_decode_gives_the_same_constrained_output(fmt_model):
    fmt, model = fmt_model
    prompt = fmt.prompt(DIALOG, TOOLS, {"type": "function", "function": {"name": "wx"}})
    rows = [(0.0, None), (1.0, 5)]
    eager = run_rows(fmt, model, prompt, rows=rows, max_tokens=200)[1]
    compiled = run_rows(fmt, model, prompt, rows=rows, max_tokens=200, compile=True)[1]
    assert [r.output for r in compiled] == [r.output for r in eager]


def test_strict_tools_under_auto(fmt_model):
    """Free text, then a section in which the strict tool's arguments follow its schema; the other
    tool's may be any JSON object; text after the section, or bad arguments, are refused."""
    fmt, _ = fmt_model
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1]]
    prompt = fmt.prompt(DIALOG, tools)

    def accepted(text: str) -> bool:
        return accepts(fmt, prompt.grammar, text)

    call = "<|tool_call_begin|>functions.{}:{}<|tool_call_argument_begin|>{}<|tool_call_end|>"
    good = ("Let me look.<|tool_calls_section_begin|>" + call.format("wx", 2, '{"c": "pa", "d": 2}')
            + call.format("tm", 3, '{"any": [1, 2]}') + "<|tool_calls_section_end|>")
    assert accepted(good) and accepted("Just text, no call.<|im_end|>")
    assert not accepted(good.replace('"d": 2', '"d": 9'))  # outside the strict schema
    assert not accepted(good.replace("tm:3", "tm:2"))  # the id index must count on
    assert not accepted(good + "more")
    assert fmt.prompt(DIALOG, TOOLS).grammar is None  # no strict tool: unconstrained, as before
    assert fmt.prompt(DIALOG, tools, "none").grammar is None


def test_strict_tools_flag_constrains_every_tool_and_declares_them_unchanged(fmt_model):
    """`strict_tools` (the agent's and the evaluation's --strict-tools): the grammar of every tool marked
    strict, over the very prompt ids the tools as declared give."""
    fmt, model = fmt_model
    prompt, plain = fmt.prompt(DIALOG, TOOLS, strict_tools=True), fmt.prompt(DIALOG, TOOLS)
    assert prompt.ids == plain.ids and plain.grammar is None
    call = "<|tool_call_begin|>functions.{}:{}<|tool_call_argument_begin|>{}<|tool_call_end|>"
    good = "<|tool_calls_section_begin|>" + call.format("wx", 2, '{"c": "pa", "d": 2}') + \
        call.format("tm", 3, '{"z": "cet"}') + "<|tool_calls_section_end|>"
    assert accepts(fmt, prompt.grammar, good) and accepts(fmt, prompt.grammar, "No call.<|im_end|>")
    assert not accepts(fmt, prompt.grammar, good.replace('{"z": "cet"}', '{"any": 1}'))  # tm's schema holds now
    assert not accepts(fmt, prompt.grammar, good.replace("functions.tm:3", "functions.tx:3"))  # undeclared
    assert fmt.prompt(DIALOG, TOOLS, "none", strict_tools=True).grammar is None
    for reply in run_rows(fmt, model, prompt, max_tokens=200)[0]:  # whatever a random model writes
        assert not reply.errors, reply
        for c in reply.message.get("tool_calls") or []:
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])


def test_ids_beyond_the_tokenizer_are_never_allowed(fmt_model):
    fmt, _ = fmt_model
    tokenizer = fmt.tokenizer  # 512 ids
    for vocab in (640, 400):  # a model with more embedding rows than the tokenizer has ids, and fewer
        text = constrain.grammar_text(None, None, {"type": "json_object"}, 0)
        grammar = constrain.compile_grammar(tokenizer, vocab, fmt.stop_ids, text)
        row = torch.zeros(-(-vocab // 32), dtype=torch.int32)
        grammar.start().fill(row)
        allowed = allowed_NV(row[None], vocab)[0].nonzero().flatten().tolist()
        assert allowed == [ord("{")]


def test_apply_mask_touches_only_constrained_rows():
    logits = torch.randn(3, 70)
    before = logits.clone()
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 0], bitmask[0, 2] = 1 << 5, 1 << 1  # ids 5 and 65
    apply_mask(logits, [1], bitmask)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert torch.equal(logits[1].isfinite().nonzero().flatten(), torch.tensor([5, 65]))
    assert torch.equal(logits[1, [5, 65]], before[1, [5, 65]])


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": TOOLS + [{"type": "function", "function": {"name": "f", "strict": True,
                                                            "parameters": {"$ref": "#/nowhere"}}}]},
     "tools[2].function.parameters"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "a"}}}},
     "response_format.json_schema.schema"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_constraints_are_chat_errors(fmt_model, kw, param):
    fmt, _ = fmt_model
    with pytest.raises(ChatError) as e:
        fmt.prompt([{"role": "user", "content": "hi"}], kw.get("tools"), kw.get("tool_choice"),
                   kw.get("response_format"))
    assert e.value.param == param


def test_over_http(fmt_model):
    """The app hands the grammar to every choice; bad constraints are 400s in OpenAI's shape."""
    from fastapi.testclient import TestClient

    from openk2.server import create_app
    fmt, model = fmt_model
    app = create_app(model, fmt.tokenizer, "tiny")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Who?"}], "n": 2, "seed": 0,
            "max_tokens": 1500, "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                                          "schema": PERSON}}}
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
        body = {**body, "n": 1, "stream": True, "tools": TOOLS, "tool_choice": "required", "response_format": None}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        deltas = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls") or []]
        assert deltas and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        name = deltas[0]["function"]["name"]
        args = "".join(d["function"].get("arguments") or "" for d in deltas if d["index"] == 0)
        jsonschema.validate(json.loads(args), SCHEMAS[name])
        bad = {**body, "stream": False, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "objekt"}}}]}
        r = http.post("/v1/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"


def test_strict_schema_cannot_be_escaped_with_markers_spelled_as_text(fmt_model):
    """Free text under a strict tool holds no `<|` at all: a call section written in plain tokens (which
    the parsers read, singular spelling included) would otherwise bring back arguments outside the schema."""
    fmt, _ = fmt_model
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    grammar = fmt.prompt(DIALOG, tools).grammar
    plain = fmt.tokenizer.encode("ok <|tool_call_section_begin|><|tool_call_begin|>functions.wx:2")
    assert all(t < 256 for t in plain)  # every marker here is text, not a special id
    assert not accepts(fmt, grammar, fmt.tokenizer.decode(plain)[:5])  # "ok <|" is already refused
    assert accepts(fmt, grammar, "a < b | c and x<y")


def test_keywords_llguidance_lacks_are_relaxed_unless_strict(fmt_model):
    """A forced call to a tool whose schema uses `uniqueItems` (pydantic sets, MCP servers) is served,
    enforcing the rest of the schema; a `strict` tool or json_schema with it is a 400 naming the schema."""
    fmt, _ = fmt_model
    tags = {"type": "object", "properties": {"t": {"type": "array", "items": {"enum": ["a", "b"]},
                                                   "uniqueItems": True}}, "required": ["t"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "tag", "parameters": tags}}, TOOLS[0]]
    grammar = fmt.prompt(DIALOG, tools, "required").grammar
    assert accepts(fmt, grammar, 'tag:2<|tool_call_argument_begin|>{"t": ["a"]}<|tool_call_end|>')
    assert not accepts(fmt, grammar, 'tag:2<|tool_call_argument_begin|>{"t": ["c"]}')  # the rest holds
    strict = [{"type": "function", "function": {"name": "tag", "parameters": tags, "strict": True}}]
    with pytest.raises(ChatError) as e:
        fmt.prompt(DIALOG, strict)
    assert e.value.param == "tools[0].function.parameters"
    spec = {"name": "t", "schema": tags}
    assert fmt.prompt(DIALOG, response_format={"type": "json_schema", "json_schema": spec}).grammar is not None
    with pytest.raises(ChatError, match="uniqueItems"):
        fmt.prompt(DIALOG, response_format={"type": "json_schema", "json_schema": {**spec, "strict": True}})


def test_a_thinking_model_may_think_before_constrained_content(fmt_model):
    """With the reasoning parser on, response_format and strict tools allow a `<think>…</think>` block
    first (free of markers), then the constrained reply, which the reply parser splits as it should."""
    fmt, model = fmt_model
    thinking = dataclasses.replace(fmt, reasoning=True)
    prompt = thinking.prompt(DIALOG, response_format={"type": "json_schema", "json_schema": {"schema": PERSON}})
    text = '<think>a person, then</think>{"n": "ab", "a": 3, "p": ["cat"]}'
    assert accepts(thinking, prompt.grammar, text) and accepts(thinking, prompt.grammar, text[text.index("{"):])
    assert not accepts(thinking, prompt.grammar, "<think>x<|im_end|>")  # markers in thought: refused
    reply = thinking.reply(text, prompt, "stop")
    assert reply.message["reasoning_content"] == "a person, then"
    assert json.loads(reply.message["content"]) == {"n": "ab", "a": 3, "p": ["cat"]}
    assert not accepts(fmt, fmt.prompt(DIALOG, response_format={"type": "json_object"}).grammar, "<think>")


def test_parallel_tool_calls_false_keeps_one_call_without_a_grammar(fmt_model):
    fmt, _ = fmt_model
    call = "<|tool_call_begin|>functions.wx:{}<|tool_call_argument_begin|>{{}}<|tool_call_end|>"
    text = "<|tool_calls_section_begin|>" + call.format(2) + call.format(3) + "<|tool_calls_section_end|>"
    for parallel, n in ((None, 2), (True, 2), (False, 1)):
        prompt = fmt.prompt(DIALOG, TOOLS, parallel_tool_calls=parallel)
        assert prompt.grammar is None
        reply = fmt.reply(text, prompt, "stop")
        assert [c["id"] for c in reply.message["tool_calls"]] == [f"functions.wx:{i}" for i in range(2, 2 + n)]
        stream = fmt.stream_parser(prompt)
        deltas = stream.feed(text) + stream.finish("stop")
        assert len({d["tool_calls"][0]["index"] for d in deltas if "tool_calls" in d}) == n
        assert stream.errors == reply.errors and (n == 2) == (not reply.errors)


@pytest.mark.parametrize("name", ["a:b", "get/weather", "", ".x", "a..b", "x" * 65, None])
def test_tool_names_the_call_ids_cannot_carry_are_400s(fmt_model, name):
    fmt, _ = fmt_model
    tools = [TOOLS[1], {"type": "function", "function": {"name": name, "parameters": WEATHER}}]
    with pytest.raises(ChatError) as e:
        fmt.prompt(DIALOG, tools, "required")
    assert e.value.param == "tools[1].function.name"
    assert fmt.prompt(DIALOG, [{"type": "function", "function": {"name": "ns.get-wx_2"}}]).ids
