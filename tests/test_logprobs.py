"""Log-probs: the engine's per-token and prompt log-probs equal log_softmax of the model's full-forward
logits (no cache, one pass over prompt + output) for a mixed batch at several prefill chunk sizes;
rows that do not ask cost nothing. The server's OpenAI shapes are tested in test_server_logprobs.py."""

import pytest
import torch

from openk2.config import PRESETS
from openk2.engine import SamplingParams, generate_recompute
from openk2.engine import engine as engine_mod
from openk2.engine.engine import Engine, EngineConfig
from openk2.model import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model(PRESETS["k2-tiny"], seed=3).eval()


def _prompt(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model, prompt, output):
    """log_softmax of one full forward over prompt + output: row j scores token j+1. [S+n-1, V]"""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output[:-1]]))[0]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("chunk", [3, 7, 256])
def test_logprobs_equal_full_forward_for_a_mixed_batch(tiny, chunk):
    engine = Engine(tiny, EngineConfig(cache_tokens=1024, block_size=8, prefill_chunk=chunk, idle_prefill_chunk=chunk))
    specs = [  # (prompt length, params)
        (9, SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=True)),  # greedy
        (5, SamplingParams(max_tokens=7, temperature=0.9, top_k=20, seed=1, logprobs=0)),  # sampled, chosen only
        (12, SamplingParams(max_tokens=5)),  # greedy, asks for nothing
        (4, SamplingParams(max_tokens=6, temperature=1.3, top_p=0.8, seed=2, logprobs=5, prompt_logprobs=True)),
    ]
    reqs = [engine.add_request(_prompt(n, i), p) for i, (n, p) in enumerate(specs)]
    engine.run()
    for (n, params), req in zip(specs, reqs):
        ref = _reference(tiny, req.prompt, req.output)
        if params.logprobs is None:
            assert req.logprobs == [] and req.prompt_logprobs == []
            continue
        assert [e.token for e in req.logprobs] == req.output
        for j, e in enumerate(req.logprobs):  # output token j is scored at position n-1+j
            row = ref[n - 1 + j]
            assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-4)
            top_lp, top_ids = row.topk(params.logprobs)
            assert [t for t, _ in e.top] == top_ids.tolist()
            assert [lp for _, lp in e.top] == pytest.approx(top_lp.tolist(), abs=1e-4)
        if params.prompt_logprobs:
            assert len(req.prompt_logprobs) == n and req.prompt_logprobs[0] is None
            got = torch.tensor([e.logprob for e in req.prompt_logprobs[1:]])
            want = ref[torch.arange(n - 1), torch.tensor(req.prompt[1:])]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            assert [e.token for e in req.prompt_logprobs[1:]] == req.prompt[1:]
            assert all(len(e.top) == params.logprobs for e in req.prompt_logprobs[1:])
        else:
            assert req.prompt_logprobs == []


def test_greedy_output_is_the_top_logprob_and_matches_recompute(tiny):
    engine = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=4, idle_prefill_chunk=4))
    prompt = _prompt(10, 7)
    req = engine.add_request(prompt, SamplingParams(max_tokens=5, logprobs=1))
    engine.run()
    assert req.output == generate_recompute(tiny, torch.tensor([prompt]), SamplingParams(max_tokens=5))[0].tolist()
    assert all(e.top[0] == (e.token, e.logprob) for e in req.logprobs)
    assert all(e.logprob <= 0 for e in req.logprobs)


def test_no_logprob_work_for_rows_that_do_not_ask(tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("token_logprobs ran for a request that did not ask")
    monkeypatch.setattr(engine_mod, "token_logprobs", refuse)
    engine = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=4, idle_prefill_chunk=4))
    reqs = [engine.add_request(_prompt(9, 1), SamplingParams(max_tokens=4)),
            engine.add_request(_prompt(6, 2), SamplingParams(max_tokens=4, temperature=1.0, seed=0))]
    engine.run()
    assert all(len(r.output) == 4 and not r.logprobs and not r.prompt_logprobs for r in reqs)


def test_negative_logprobs_refused():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
