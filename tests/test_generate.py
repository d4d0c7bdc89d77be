"""Generation as Engine requests: greedy and seeded sampling equal the full recompute; sampling is
well-formed."""

import pytest
import torch

from openk2.cli import main
from openk2.config import PRESETS
from openk2.engine import SamplingParams, generate, generate_recompute, sample
from openk2.model import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model(PRESETS["k2-tiny"], seed=1).eval()


def test_greedy_equals_recompute(tiny):
    prompt = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=24)
    cached = generate(tiny, prompt, params)
    assert cached.shape == (3, 24)
    assert torch.equal(cached, generate_recompute(tiny, prompt, params))


def test_seeded_sampling_is_reproducible_and_matches_recompute(tiny):
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = generate(tiny, prompt, params), generate(tiny, prompt, params)
    assert torch.equal(a, b)
    assert torch.equal(a, generate_recompute(tiny, prompt, params))
    other = generate(tiny, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=8))
    assert not torch.equal(a, other)
    rows = generate(tiny, prompt.repeat(2, 1), params)  # row r samples from seed + r
    assert torch.equal(rows[0], a[0]) and not torch.equal(rows[1], a[0])
    assert torch.equal(rows, generate_recompute(tiny, prompt.repeat(2, 1), params))


def test_stop_token_ends_generation(tiny):
    prompt = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    free = generate(tiny, prompt, SamplingParams(max_tokens=10))[0]
    stop = int(free[3])
    first = free.tolist().index(stop)
    stopped = generate(tiny, prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop,)))[0]
    assert stopped.tolist() == free[:first + 1].tolist()


def test_sample_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample(logits, SamplingParams(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...: top_p 0.8 keeps the first two
    nucleus = sample(logits, SamplingParams(temperature=1.0, top_p=0.8), gen)
    assert set(nucleus.tolist()) == {0, 1}
    assert probs[:2].sum() > 0.8 > probs[0]
    assert (sample(logits, SamplingParams(), gen) == 0).all()  # temperature 0 is greedy


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_sampling_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_prompt_longer_than_context_is_rejected(tiny):
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(tiny, torch.zeros(1, 500, dtype=torch.long), SamplingParams(max_tokens=20))


def test_cli_generate_greedy_ids(capsys, tiny, tmp_path):
    from openk2.checkpoint import save_hf
    save_hf(tiny, tmp_path, progress=False)
    main(["generate", str(tmp_path), "--prompt-ids", "1,2,3,4", "--max-tokens", "6", "--dtype", "fp32"])
    ids = [int(t) for t in capsys.readouterr().out.split()]
    expect = generate(tiny, torch.tensor([[1, 2, 3, 4]]), SamplingParams(max_tokens=6))[0].tolist()
    stop = PRESETS["k2-tiny"].eos_token_id
    assert ids == (expect[:expect.index(stop) + 1] if stop in expect else expect)


def test_cli_generate_rejects_bad_ids():
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        main(["generate", "k2-tiny", "--prompt-ids", "1,9999"])


def test_bf16_decode_kernels_match_default_kernels():
    """One-row bf16 decode steps run without oneDNN (engine.decode.decode_kernels): same logits."""
    from openk2.engine.decode import decode_kernels
    model = build_model(PRESETS["k2-tiny"], dtype=torch.bfloat16, seed=3).eval()
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4))
    before = torch.backends.mkldnn.enabled
    with torch.no_grad():
        cache = model.new_cache(1, 13)
        model(prompt[:, :11], 0, cache)
        with decode_kernels(model, 1):
            assert torch.backends.mkldnn.enabled is False
            native = model(prompt[:, 11:], 11, cache).float()
        assert torch.backends.mkldnn.enabled == before  # restored
        default = model(prompt[:, 11:], 11, cache).float()
    assert (native - default).abs().max() < 2e-2 * default.abs().max()
    torch.testing.assert_close(generate(model, prompt, SamplingParams(max_tokens=6)),
                               generate_recompute(model, prompt, SamplingParams(max_tokens=6)))


@pytest.mark.parametrize("absorb", [True, False])
def test_rows_at_different_lengths_decode_together(tiny, absorb):
    """Per-row start positions: three prompts of lengths 3, 9, 6 prefilled into their own cache rows,
    then decoded in one batch; every row's greedy tokens equal its own full recompute."""
    from openk2.model.attention import LatentCache
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (1, n), generator=gen) for n in (3, 9, 6)]
    cache = tiny.new_cache(3, 32)
    lengths, tokens = torch.tensor([p.shape[1] for p in prompts]), []
    with torch.no_grad():
        for r, p in enumerate(prompts):  # each prompt into its own row (a view of the shared cache)
            rows = [LatentCache(c.ckv[r:r + 1]) for c in cache]
            tokens.append(tiny(p, 0, rows)[:, -1].argmax(-1))
        tok, out = torch.cat(tokens), [torch.cat(tokens)[:, None]]
        for _ in range(7):
            tok = tiny(tok[:, None], lengths, cache, absorb=absorb)[:, -1].argmax(-1)
            lengths = lengths + 1
            out.append(tok[:, None])
    batched = torch.cat(out, 1)
    for r, p in enumerate(prompts):
        assert torch.equal(batched[r], generate_recompute(tiny, p, SamplingParams(max_tokens=8))[0]), r


def test_per_row_positions_need_a_cache(tiny):
    with pytest.raises(ValueError, match="need a cache"):
        tiny(torch.zeros(2, 1, dtype=torch.long), torch.tensor([3, 4]))
