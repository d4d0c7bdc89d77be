"""Chat template and tool-call parsing: byte-exact renders (K2-SPEC §6.3 copied verbatim), the jinja
path against transformers' own `apply_chat_template`, and the streaming parser bound to the
whole-text parser on every parser case, fed in 1-char and random chunks."""

import json
import random

import pytest

from openk2.tokenizer import Tokenizer
from openk2.tokenizer.chat import (assign_tool_call_ids, load_chat_template, render_chat, render_message,
                                   template_variables)
from openk2.tokenizer.toolcalls import ParsedOutput, StreamingToolParser, ToolCall, parse_tool_calls

# ---------------------------------------------------------------- K2-SPEC §6.3, copied, not retyped
SPEC_TOOLS = [{"type":"function","function":{"name":"get_weather","description":"Get weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]  # noqa: E231,E501
SPEC_RENDERED = ('<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather",'
 '"description":"Get weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},'
 '"required":["city"]}}}]<|im_end|>'
 '<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>'
 '<|im_user|>user<|im_middle|>Weather in Beijing and Shanghai?<|im_end|>'
 '<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>'
 '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|>'
 '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Shanghai"}<|tool_call_end|>'
 '<|tool_calls_section_end|><|im_end|>'
 '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"weather": "Sunny"}<|im_end|>'
 '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n{"weather": "Rain"}<|im_end|>'
 '<|im_assistant|>assistant<|im_middle|>')  # noqa: E128


def weather_call(i, city):
    return {"id": f"functions.get_weather:{i}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


SPEC_MESSAGES = [
    {"role": "user", "content": "Weather in Beijing and Shanghai?"},
    {"role": "assistant", "content": "", "tool_calls": [weather_call(0, "Beijing"), weather_call(1, "Shanghai")]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
     "content": '{"weather": "Sunny"}'},
    {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather",
     "content": '{"weather": "Rain"}'},
]
SYS = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"


def test_spec_example_byte_exact():
    assert render_chat(SPEC_MESSAGES, SPEC_TOOLS) == SPEC_RENDERED


def test_no_tools_default_system_prompt():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    assert render_chat(msgs) == (SYS + "<|im_user|>user<|im_middle|>Hi<|im_end|>"
                                 "<|im_assistant|>assistant<|im_middle|>Hello!<|im_end|>"
                                 "<|im_user|>user<|im_middle|>Bye<|im_end|>" + GEN)
    assert render_chat(msgs[:1], add_generation_prompt=False) == SYS + "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    assert render_chat([]) == GEN  # nothing to open with, so no default system turn either


def test_system_message_replaces_default_only_when_first():
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(own) == ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
                                "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN)
    late = own[::-1]  # the rule is "first message not system" (§6.1), as in K2's templates
    assert render_chat(late).startswith(SYS + "<|im_user|>user")


def test_list_content_and_names_in_headers():
    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]
    lookup = {"id": "functions.lookup:0", "type": "function",
              "function": {"name": "lookup", "arguments": {"q": "北京"}}}
    msgs = [{"role": "system", "content": parts("Be ", "brief.")},
            {"role": "user", "name": "alice", "content": parts("Hi, ", "北京?")},
            {"role": "assistant", "content": "Calling.", "tool_calls": [lookup]},
            {"role": "tool", "tool_call_id": "functions.lookup:0", "content": parts("ok")}]
    assert render_chat(msgs) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>alice<|im_middle|>Hi, 北京?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Calling.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.lookup:0<|tool_call_argument_begin|>{"q": "北京"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.lookup:0\nok<|im_end|>" + GEN)


def test_bad_messages_are_errors():
    with pytest.raises(ValueError, match="image_url"):
        render_chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="no id"):
        render_message({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]})
    with pytest.raises(ValueError, match="tool_call_id"):
        render_message({"role": "tool", "content": "x"})


def test_assign_tool_call_ids_counts_over_the_dialog():
    def bare(name):
        return {"type": "function", "function": {"name": name, "arguments": "{}"}}
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [weather_call(0, "A"), bare("search")]},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "", "tool_calls": [bare("get_weather")]}]
    out = assign_tool_call_ids(msgs)
    assert [c["id"] for m in out for c in m.get("tool_calls", [])] == [
        "functions.get_weather:0", "functions.search:1", "functions.get_weather:2"]
    assert "id" not in msgs[1]["tool_calls"][1]  # the input is not modified


def test_render_tokenizes_markers_to_single_special_ids():
    tok = Tokenizer.byte_level()
    ids = tok.encode(SPEC_RENDERED, allow_special=True)
    assert tok.decode(ids) == SPEC_RENDERED
    specials = {i: name for name, i in tok.special_ids.items()}
    named = [specials[i] for i in ids if i in specials]
    markers = ["<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>", "<|im_end|>",
               "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
               "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
    assert all(SPEC_RENDERED.count(m) == named.count(m) > 0 for m in markers)
    assert len(named) == sum(SPEC_RENDERED.count(m) for m in markers)  # no marker left as bytes


def test_render_then_parse_round_trip():
    calls = [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}'),
             ToolCall("functions.a.b:1", "a.b", '{"x": [1, 2]}')]
    turn = render_message({"role": "assistant", "content": "Sure.", "tool_calls": [c.to_dict() for c in calls]})
    generated = turn.removeprefix(GEN).removesuffix("<|im_end|>")
    assert parse_tool_calls(generated) == ParsedOutput("Sure.", calls, [], False)


# ---------------------------------------------------------------- jinja path against transformers
K2_LIKE_TEMPLATE = r"""{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}{%- for part in content -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- for m in messages -%}
  {%- if loop.first and m.role != 'system' -%}
<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}
  {%- if m.role == 'user' -%}<|im_user|>{%- elif m.role == 'assistant' -%}<|im_assistant|>
  {%- else -%}<|im_system|>{%- endif -%}
  {{ m.name or m.role }}<|im_middle|>
  {%- if m.role == 'tool' -%}## Return of {{ m.tool_call_id }}{{ '\n' }}{%- endif -%}
  {{ text(m.content) }}
  {%- if m.role == 'assistant' and m.tool_calls -%}
<|tool_calls_section_begin|>
    {%- for call in m.tool_calls -%}
<|tool_call_begin|>{{ call.id }}<|tool_call_argument_begin|>
      {%- if call.function.arguments is string -%}{{ call.function.arguments }}
      {%- else -%}{{ call.function.arguments | tojson }}{%- endif -%}
<|tool_call_end|>
    {%- endfor -%}
<|tool_calls_section_end|>
  {%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"""

# whitespace control, tojson defaults and non-ASCII, namespace, generation blocks, special tokens
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'assistant' %}
{% generation %}A: {{ m.content }} [{{ m.thinking }}|{{ m.reasoning_content }}] {{ m | tojson }}{% endgeneration %}
        {% set ns.n = ns.n + 1 %}
    {% else %}
{{ m.role }}: {{ m.content | tojson }} {{ m | tojson }}
    {% endif %}
{% endfor %}
{{ ns.n }} {{ tools | tojson }} {{ dict(a=1) | tojson(indent=2) }}{{ pad_token }}|{{ eos_token }}
{% if add_generation_prompt %}A:{% endif %}"""

CONVERSATIONS = [
    (SPEC_MESSAGES, SPEC_TOOLS),
    ([{"role": "user", "content": "Hi <b>&</b> 北京", "name": None},
      {"role": "assistant", "content": "Hello", "reasoning": "think", "tool_calls": None},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], None),
    ([{"role": "system", "content": "S"}, {"role": "user", "name": "bob", "content": "x"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": {"k": "é"}}}]},
      {"role": "tool", "tool_call_id": "functions.f:0", "content": "done"}], []),
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    pytest.importorskip("jinja2")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]",
                                                unk_token="[UNK]")


@pytest.mark.parametrize("template", [K2_LIKE_TEMPLATE, FEATURE_TEMPLATE], ids=["k2_like", "features"])
@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_jinja_render_equals_transformers(hf_tokenizer, tmp_path, template, case, gen):
    msgs, tools = CONVERSATIONS[case]
    hf_tokenizer.chat_template = template
    expected = hf_tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)
    hf_tokenizer.save_pretrained(tmp_path)  # chat_template.jinja + tokenizer_config.json
    ours = render_chat(msgs, tools, gen, template=load_chat_template(tmp_path), **template_variables(tmp_path))
    assert ours == expected
    if template is K2_LIKE_TEMPLATE:  # the built-in renderer is the same template, in Python
        assert render_chat(msgs, tools, gen) == expected


def test_jinja_k2_like_template_gives_spec_example():
    assert render_chat(SPEC_MESSAGES, SPEC_TOOLS, template=K2_LIKE_TEMPLATE) == SPEC_RENDERED


def test_jinja_sandbox_and_raise_exception():
    jinja2 = pytest.importorskip("jinja2")
    with pytest.raises(jinja2.exceptions.TemplateError, match="nope"):
        render_chat([{"role": "user", "content": "x"}], template="{{ raise_exception('nope') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat([{"role": "user", "content": "x"}], template="{{ messages.__class__.__mro__ }}{{ ''.__class__ }}"
                    "{% set x = messages.append(1) %}")


def test_load_chat_template(tmp_path):
    assert load_chat_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "from config", "bos_token": {"content": "[BOS]"}}))
    assert load_chat_template(tmp_path) == "from config"
    assert template_variables(tmp_path) == {"bos_token": "[BOS]"}
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "t"},
                                                    {"name": "default", "template": "d"}]}))
    assert load_chat_template(tmp_path) == "d"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert load_chat_template(tmp_path) == "from file"  # the .jinja file wins, as in transformers


# ---------------------------------------------------------------- tool-call parsing
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
BJ, SH = '{"city": "Beijing"}', '{"city": "Shanghai"}'


def call(cid, args):
    return CB + cid + AB + args + CE


def W(i, args=BJ, prefix="functions."):
    return ToolCall(f"{prefix}get_weather:{i}", "get_weather", args)


# name -> (generated text, content, tool calls, substrings of the errors in order, truncated)
PLAIN = "Hello <|im not a marker, < and <| are text"
CASES = {
    "plain_text": (PLAIN, PLAIN, [], [], False),
    "stray_markers": ("a<|tool_call_begin|>b<|im_end|>c<|reserved_token_163600|>d<|tool_calls_section_end|>e [EOS]",
                     "abcde [EOS]", [], [], False),
    "held_partial_marker": ("Hi <|tool_calls_sec", "Hi <|tool_calls_sec", [], [], False),
    "one_call": (SB + call("functions.get_weather:0", BJ) + SE, None, [W(0)], [], False),
    "parallel": (SB + call("functions.get_weather:0", BJ) + call("functions.get_weather:1", SH) + SE,
                 None, [W(0), W(1, SH)], [], False),
    "no_prefix": (SB + call("get_weather:0", BJ) + SE, None, [W(0, prefix="")], [], False),
    "id_drift": (SB + call("functions.get_weather:7", BJ) + call("functions.get_weather:3", SH) + SE,
                 None, [W(7), W(3, SH)], [], False),
    "odd_names": (SB + call("functions.a.b:0", "{}") + call("functions.get-time:1", "{}") + call("fetch", "{}")
                  + call("functions.mcp:read:3", "{}") + SE,
                  None, [ToolCall("functions.a.b:0", "a.b", "{}"), ToolCall("functions.get-time:1", "get-time", "{}")],
                  ["tool call 2: malformed id 'fetch'", "tool call 3: malformed id"], False),
    "whitespace": ("\n" + SB + "\n " + CB + "  functions.get_weather:0\n" + AB + "\n " + BJ + " \n" + CE + "\n" + SE,
                   "\n", [W(0)], [], False),
    "text_before": ("Let me check. 北京" + SB + call("functions.get_weather:0", BJ) + SE, "Let me check. 北京",
                    [W(0)], [], False),
    "text_after": (SB + call("functions.get_weather:0", BJ) + SE + " Done.", " Done.", [W(0)], [], False),
    "two_sections": (SB + call("functions.get_weather:0", BJ) + SE + "mid" + SB + call("functions.get_weather:1", SH)
                     + SE, "mid", [W(0), W(1, SH)], [], False),
    "invalid_json": (SB + call("functions.get_weather:0", '{"city": "Bei') + call("functions.get_weather:1", SH) + SE,
                     None, [W(0, '{"city": "Bei'), W(1, SH)],
                     ["tool call 0 (functions.get_weather:0): arguments are not valid JSON"], False),
    "not_an_object": (SB + call("functions.get_weather:0", "[1, 2]") + SE, None, [W(0, "[1, 2]")],
                      ["not a JSON object"], False),
    "duplicate_ids": (SB + call("functions.get_weather:0", BJ) + call("functions.get_weather:0", SH)
                      + call("functions.get_weather:1", "{}") + SE, None, [W(0), W(1, SH), W(2, "{}")],
                      ["id 'functions.get_weather:0' repeated; renamed 'functions.get_weather:1'",
                       "id 'functions.get_weather:1' repeated; renamed 'functions.get_weather:2'"], False),
    "singular_section": ("x" + "<|tool_call_section_begin|>" + call("functions.get_weather:0", BJ)
                         + "<|tool_call_section_end|>y", "xy", [W(0)], [], False),
    "malformed_ids": (SB + call(" ", "{}") + call("functions.get weather:1", "{}") + call("functions.:2", "{}")
                      + call("functions.get_weather:3", BJ) + SE, None, [W(3)],
                      ["tool call 0: malformed id ''", "tool call 1: malformed id", "tool call 2: malformed"], False),
    "no_argument_marker": (SB + CB + "functions.f:0" + CE + call("functions.get_weather:1", BJ) + SE, None,
                           [W(1)], ["tool call 0: no <|tool_call_argument_begin|>"], False),
    "missing_call_end": (SB + CB + "functions.get_weather:0" + AB + BJ + CB + "functions.get_weather:1" + AB + SH
                         + SE, None, [W(0), W(1, SH)], [], False),
    "stray_text": (SB + "junk" + call("functions.get_weather:0", BJ) + " more" + SE, None, [W(0)],
                   ["unexpected text in tool-call section: 'junk'", "'more'"], False),
    "cut_in_arguments": ("Checking." + SB + call("functions.get_weather:0", BJ) + CB + "functions.get_weather:1" + AB
                         + '{"city": "Sh', "Checking.", [W(0), W(1, '{"city": "Sh')], ["tool call 1 (functions"], True),
    "cut_in_id": (SB + call("functions.get_weather:0", BJ) + CB + "functions.get_wea", None, [W(0)],
                  ["tool call 1: cut off"], True),
    "cut_after_a_call": (SB + call("functions.get_weather:0", BJ) + "\n", None, [W(0)], [], True),
    "cut_first_call": (SB + CB + "functions.get_weather:0" + AB + '{"ci', None, [W(0, '{"ci')], ["cut off"], True),
    "cut_in_a_marker": (SB + call("functions.get_weather:0", BJ) + CB + "functions.f:1" + AB + "{} <|tool_call_e", None,
                        [W(0), ToolCall("functions.f:1", "f", "{} <|tool_call_e")], ["cut off"], True),
}


@pytest.mark.parametrize("name", CASES)
def test_whole_text_parse(name):
    text, content, calls, errors, truncated = CASES[name]
    out = parse_tool_calls(text)
    assert out.content == content
    assert out.tool_calls == calls
    assert len(out.errors) == len(errors) and all(e in got for e, got in zip(errors, out.errors)), out.errors
    assert out.truncated == truncated


def chunks(text, rng, sizes):
    i = 0
    while i < len(text):
        n = rng.choice(sizes)
        yield text[i:i + n]
        i += n


def stream(text, pieces, **kw):
    """Feed `pieces`, then assemble the deltas: content, calls, and checks of the delta protocol."""
    parser, deltas = StreamingToolParser(**kw), []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish("stop")
    content, calls = "", {}
    for d in deltas:
        assert set(d) <= {"content", "tool_calls"} and len(d) == 1
        if "content" in d:
            assert d["content"] and SB not in d["content"]
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        if "id" in tc:  # the header: once per index, indices in order, empty arguments
            assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["arguments"] == ""
            calls[tc["index"]] = [tc["id"], tc["function"]["name"], ""]
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            assert tc["function"]["arguments"] and tc["index"] == len(calls) - 1
            calls[tc["index"]][2] += tc["function"]["arguments"]
    got = ParsedOutput(content or None, [ToolCall(*c) for c in calls.values()], parser.errors, parser.truncated)
    return got, parser


@pytest.mark.parametrize("name", CASES)
def test_streaming_equals_whole_text(name):
    text = CASES[name][0]
    whole = parse_tool_calls(text)
    rng = random.Random(1234)
    splits = [list(text), [text]] + [list(chunks(text, rng, sizes)) for sizes in ([1, 2, 3], [1, 5, 17, 40])] * 3
    for pieces in splits:
        assert "".join(pieces) == text
        assert stream(text, pieces)[0] == whole


def test_arguments_stream_before_the_call_ends():
    head = SB + CB + "functions.get_weather:0" + AB + ' {"city": "Bei'
    parser = StreamingToolParser()
    deltas = parser.feed(head)
    assert [d["tool_calls"][0]["function"] for d in deltas] == [
        {"name": "get_weather", "arguments": ""}, {"arguments": '{"city": "Bei'}]
    assert parser.feed('jing"}  <|tool_call_e') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'jing"}'}}]}]
    assert parser.feed("nd|>" + SE) == [] and parser.finish("stop") == [] and parser.finish_reason == "tool_calls"


def test_content_holds_back_only_what_may_be_special_text():
    parser = StreamingToolParser()
    assert parser.feed("a <") == [{"content": "a "}] and parser.feed("|im_e") == []
    assert parser.feed("nd|> b <|im x") == [{"content": " b <|im x"}]
    assert parser.feed("<|reserved_token_16") == [] and parser.finish("stop") == [{"content": "<|reserved_token_16"}]


def test_a_runaway_section_is_bounded():
    text = SB + "".join(call(f"functions.f:{i}", "{}") for i in range(7)) + SE
    out = parse_tool_calls(text, max_calls=3)
    assert [c.id for c in out.tool_calls] == ["functions.f:0", "functions.f:1", "functions.f:2"]
    assert out.errors == ["tool call 3: more than 3 calls in one reply; dropped"]
    assert out.errors[0].reason == "too_many_calls"
    parser = StreamingToolParser(max_calls=3)
    got = [parser.feed(ch) for ch in text] + [parser.finish()]
    assert sum(1 for ds in got for d in ds if "id" in d["tool_calls"][0]) == 3 and parser.errors == out.errors


@pytest.mark.parametrize("name, engine_reason, expected", [
    ("plain_text", "stop", "stop"), ("one_call", "stop", "tool_calls"), ("invalid_json", "stop", "tool_calls"),
    ("not_an_object", "stop", "tool_calls"), ("cut_in_arguments", "length", "length"),
    ("cut_first_call", "length", "length"), ("plain_text", "length", "length")])
def test_finish_reason(name, engine_reason, expected):
    parser = StreamingToolParser()
    parser.feed(CASES[name][0])
    parser.finish(engine_reason)
    assert parser.finish_reason == expected
