"""Log-probs and echo through the server, in OpenAI's shapes: chat (`logprobs`, `top_logprobs`, whole
and streamed) and text completions (`logprobs`, `echo`, `max_tokens: 0`), checked against log_softmax
of the model's full-forward logits; token texts, bytes and text offsets against the reply's text."""

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_server import serving  # noqa: E402

from openk2.config import PRESETS  # noqa: E402
from openk2.engine import SamplingParams, generate_recompute  # noqa: E402
from openk2.model import build_model  # noqa: E402
from openk2.server import create_app  # noqa: E402
from openk2.tokenizer import Tokenizer, render_chat  # noqa: E402

NAME = "k2-tiny"


@pytest.fixture(scope="module")
def setup():
    tok = Tokenizer.byte_level()
    model = build_model(PRESETS["k2-tiny"], seed=0).eval()
    app = create_app(model, tok, NAME)
    with serving(app) as port:
        yield model, tok, port


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def reference(model, ids):
    """log_softmax of one forward over `ids`: row j scores ids[j + 1]."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def greedy(model, ids, n, stop):
    out = generate_recompute(model, torch.tensor([ids]), SamplingParams(max_tokens=n))[0].tolist()
    return out[:next((i for i, t in enumerate(out) if t in stop), len(out))]  # the tokens the text is made of


def test_chat_logprobs_whole_and_streamed(setup):
    model, tok, port = setup
    messages = [{"role": "user", "content": "héllo wörld"}]
    ids = tok.encode(render_chat(messages), allow_special=True)
    stop = {tok.token_id("<|im_end|>"), tok.token_id("[EOS]")}
    r = client(port).chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=10,
                                             logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    gen = greedy(model, ids, 10, stop)
    ref = reference(model, ids + gen)
    assert len(content) == len(gen)
    for j, (t, e) in enumerate(zip(gen, content)):
        assert bytes(e.bytes) == tok.decode_bytes([t]) if t < tok.n_vocab else e.bytes == []
        assert e.logprob == pytest.approx(ref[len(ids) - 1 + j, t].item(), abs=1e-4)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy
        assert e.top_logprobs[0].token == e.token
    text = "".join(e.token for e in content if not e.token.startswith("bytes:"))
    if all(not e.token.startswith("bytes:") for e in content):
        assert text == r.choices[0].message.content
    chunks = list(client(port).chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=10,
                                                       logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # the second request reuses the first one's cached rows (the engine's prefix cache): the same tokens,
    # log-probs equal to float rounding
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content]
    for a, b in zip(streamed, content):
        assert [a.logprob, *(t.logprob for t in a.top_logprobs)] == \
            pytest.approx([b.logprob, *(t.logprob for t in b.top_logprobs)], abs=1e-4)
    plain = client(port).chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_completion_echo_scores_the_prompt(setup):
    model, tok, port = setup
    prompt = "a café, naïve"  # é and ï split across byte tokens
    ids = tok.encode(prompt)
    ref = reference(model, ids)
    for max_tokens in (0, 1, 6):
        r = client(port).completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=max_tokens,
                                            temperature=0)
        ch, lp = r.choices[0], r.choices[0].logprobs
        assert ch.text.startswith(prompt) and (max_tokens or ch.text == prompt)
        assert r.usage.completion_tokens == max_tokens or ch.finish_reason == "stop"
        assert len(lp.tokens) == len(ids) + r.usage.completion_tokens  # the generated ones, a stop id too
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = torch.tensor(lp.token_logprobs[1:len(ids)])
        torch.testing.assert_close(got, ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=1e-4, rtol=0)
        assert all(len(top) == 2 for top in lp.top_logprobs[1:])
        assert lp.tokens[:len(ids)] == [tok.decode_bytes([t]).decode("utf-8", "replace") if t < 128
                                        else "bytes:\\x%02x" % t for t in ids]
        for i, (token, at) in enumerate(zip(lp.tokens, lp.text_offset)):  # whole-character tokens sit there
            if token.startswith("bytes:"):
                continue
            if i == len(lp.tokens) - 1 and ch.finish_reason == "stop" and i >= len(ids):
                assert at == len(ch.text) and token in ("<|im_end|>", "[EOS]")  # a stop id ends the text
            else:
                assert ch.text[at:at + len(token)] == token
        assert lp.text_offset == sorted(lp.text_offset) and len(lp.tokens) == len(lp.token_logprobs)
    plain = client(port).completions.create(model=NAME, prompt=prompt, echo=True, max_tokens=3, temperature=0)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None


def test_completion_logprobs_streamed_equal_whole(setup):
    model, tok, port = setup
    kw = dict(model=NAME, prompt="once upon a time", max_tokens=8, temperature=0, logprobs=1)
    whole = client(port).completions.create(**kw).choices[0]
    chunks = list(client(port).completions.create(stream=True, **kw))
    got = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for c in chunks:
        if c.choices and c.choices[0].logprobs:
            for k in got:
                got[k] += getattr(c.choices[0].logprobs, k)
    assert got == whole.logprobs.model_dump(include=set(got))
    ids = tok.encode("once upon a time")
    gen = generate_recompute(model, torch.tensor([ids]), SamplingParams(max_tokens=8))[0].tolist()
    stop = {tok.token_id("<|im_end|>"), tok.token_id("[EOS]")}
    gen = gen[:next((i + 1 for i, t in enumerate(gen) if t in stop), len(gen))]  # a stop id is listed
    ref = reference(model, ids + gen)
    want = [ref[len(ids) - 1 + j, t].item() for j, t in enumerate(gen)]
    assert whole.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert whole.logprobs.text_offset[0] == 0


@pytest.mark.parametrize("path,body", [
    ("chat/completions", {"top_logprobs": 2}),  # needs logprobs: true
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}),
    ("completions", {"logprobs": 6}),
    ("completions", {"logprobs": -1}),
    ("completions", {"max_tokens": 0}),  # needs echo
    ("completions", {"echo": True, "stream": True}),
    ("completions", {"max_tokens": -1, "echo": True}),
])
def test_logprob_mistakes_are_400s(setup, path, body):
    port = setup[2]
    base = {"model": NAME, "max_tokens": 2, **({"messages": [{"role": "user", "content": "x"}]}
                                                if path.startswith("chat") else {"prompt": "x"})}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/{path}", json={**base, **body})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_tokenizer_info(setup):
    r = httpx.get(f"http://127.0.0.1:{setup[2]}/tokenizer_info").json()
    assert r["eos_token"] == "<|im_end|>" and r["model_max_length"] == PRESETS["k2-tiny"].max_position_embeddings


def test_echo_lists_a_generated_stop_id_where_lm_eval_drops_it():
    """lm-eval sends max_tokens 1 and reads token_logprobs[ctxlen:-1]: the generated token must be the
    last entry even when it is a stop id (which adds no text); chat's content leaves it out."""
    from openk2.engine.engine import Request
    from openk2.engine.sampler import TokenLogprob
    from openk2.server import logprobs
    from openk2.server.chat_format import ChatFormat
    from openk2.server.engine_loop import Run
    from openk2.server.protocol import ChatCompletionRequest, CompletionRequest

    tok = Tokenizer.byte_level()
    fmt = ChatFormat(tok, 64, 512)
    end = tok.token_id("<|im_end|>")
    ids = tok.encode("ab")
    req = Request(0, ids, SamplingParams(max_tokens=1, logprobs=1, prompt_logprobs=True), output=[end])
    req.prompt_logprobs = [None, TokenLogprob(ids[1], -1.5, [(ids[1], -1.5)])]
    req.logprobs = [TokenLogprob(end, -0.25, [(end, -0.25)])]
    body = CompletionRequest(model=NAME, prompt="ab", max_tokens=1, logprobs=1, echo=True)
    text, lp = logprobs.whole_completion(fmt, body, ids, Run(req, completion_tokens=1), "",
                                         logprobs.shaper_for(fmt, body))
    assert text == "ab" and lp["tokens"] == ["a", "b", "<|im_end|>"] and lp["text_offset"] == [0, 1, 2]
    assert lp["token_logprobs"] == [None, -1.5, -0.25] and lp["top_logprobs"] == [None, {"b": -1.5},
                                                                                   {"<|im_end|>": -0.25}]
    chat = ChatCompletionRequest(model=NAME, messages=[{"role": "user", "content": "x"}], logprobs=True)
    shaper = logprobs.shaper_for(fmt, chat)
    assert shaper.chat(shaper.listed(req, 1)) == {"content": [], "refusal": None}
    zero = CompletionRequest(model=NAME, prompt="ab", max_tokens=0, logprobs=0, echo=True)
    text, lp = logprobs.whole_completion(fmt, zero, ids, Run(req, completion_tokens=1), "zzz",
                                         logprobs.shaper_for(fmt, zero))
    assert text == "ab" and lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [None, -1.5]
    assert zero.max_tokens == 0 and logprobs.engine_params(SamplingParams(), zero).max_tokens == 1
