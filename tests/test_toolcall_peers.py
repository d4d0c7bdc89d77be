"""vLLM's and SGLang's Kimi-K2 tool-call cases (tests/data/peer_toolcalls.json: input, expected content,
calls and error reasons, the peer test each comes from, and the rule we chose where the peers disagree),
each checked whole and streaming: the deltas, assembled as an OpenAI client assembles chunks, equal
the expectation for every chunking (per character, per marker, random, the peer's own chunks)."""

import json
import random
import re
from pathlib import Path

import pytest

from openk2.tokenizer.toolcalls import REASONS, NEXT, StreamingToolParser, parse_tool_calls, strip_special

DATA = json.loads((Path(__file__).parent / "data" / "peer_toolcalls.json").read_text())
CASES = {case["name"]: case for case in DATA["cases"]}
MARKERS = re.compile("(" + "|".join(map(re.escape, NEXT)) + ")")


def chunkings(case):
    """Every way we feed a case: its peer's chunks, per character, per marker, random pieces."""
    text, rng = case["text"], random.Random(case["name"])
    yield from case.get("chunks", [])
    yield list(text)
    yield [p for p in MARKERS.split(text) if p]
    for sizes in ([1, 2, 3], [1, 7, 30], [4, 64]):
        pieces, i = [], 0
        while i < len(text):
            pieces.append(text[i:i + (n := rng.choice(sizes))])
            i += n
        yield pieces


def assemble(pieces):
    """Stream `pieces`; rebuild content and calls from the deltas as an OpenAI client does (a header
    with `id` opens index i, fragments append to it), checking the chunk protocol on the way."""
    parser, content, calls = StreamingToolParser(), "", []
    for delta in [d for p in pieces for d in parser.feed(p)] + parser.finish("stop"):
        assert len(delta) == 1
        if "content" in delta:
            assert delta["content"]
            content += delta["content"]
            continue
        (tc,) = delta["tool_calls"]
        if "id" in tc:
            assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["arguments"] == ""
            calls.append([tc["id"], tc["function"]["name"], ""])
        else:
            assert tc["index"] == len(calls) - 1 and set(tc) == {"index", "function"} and tc["function"]["arguments"]
            calls[-1][2] += tc["function"]["arguments"]
    return content or None, calls, parser


@pytest.mark.parametrize("name", CASES)
def test_whole(name):
    case = CASES[name]
    out = parse_tool_calls(case["text"])
    assert out.content == case["content"]
    assert [[c.id, c.name, c.arguments] for c in out.tool_calls] == case["calls"]
    assert [e.reason for e in out.errors] == case["errors"]
    assert out.truncated == case["truncated"]


@pytest.mark.parametrize("name", CASES)
def test_streaming(name):
    case, whole = CASES[name], parse_tool_calls(CASES[name]["text"])
    for pieces in chunkings(case):
        content, calls, parser = assemble(pieces)
        assert (content, calls) == (case["content"], case["calls"]), pieces
        assert parser.errors == whole.errors and parser.truncated == case["truncated"]
        assert parser.finish_reason == ("tool_calls" if calls else "stop")


def test_the_data_names_its_sources_and_rules():
    assert {c["source"].split()[0] for c in DATA["cases"]} == {"vllm-project/vllm", "sgl-project/sglang"}
    assert {c["rule"] for c in DATA["cases"] if "rule" in c} <= set(DATA["rules"])
    assert {r for c in DATA["cases"] for r in c["errors"]} <= set(REASONS)
    assert len(CASES) == len(DATA["cases"])


@pytest.mark.parametrize("case", DATA["strip"], ids=lambda c: c["source"].rsplit("::", 1)[1])
def test_special_text_stripped(case):
    assert strip_special(case["text"]) == case["stripped"]
