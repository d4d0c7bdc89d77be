"""Model pair tests (absorbed = materialised, grouped = reference) and property tests."""

import copy
import dataclasses
import math

import pytest
import torch

from openk2.config import KIMI_K2, PRESETS
from openk2.model import Transformer, build_model, count_params
from openk2.model import rows
from openk2.model import expert_loop
from openk2.model.rows import bucket_rows
from openk2.model.moe import MoE, route
from openk2.model.norm import RMSNorm
from openk2.model.rope import _correction_dim, apply_rope, rope_inv_freq

TINY = PRESETS["k2-tiny"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(TINY, seed=0).eval()
    with torch.no_grad():  # a non-zero router bias so that selection depends on it
        for layer in model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def test_absorbed_equals_materialised(tiny):
    ids = torch.randint(0, TINY.vocab_size, (3, 37))
    with torch.no_grad():
        ref = tiny(ids, absorb=False)
        absorbed = tiny(ids, absorb=True)
    torch.testing.assert_close(absorbed, ref, atol=1e-5, rtol=0)


def test_cached_chunked_prefill_and_decode_equal_one_shot(tiny):
    ids = torch.randint(0, TINY.vocab_size, (2, 30))
    with torch.no_grad():
        full = tiny(ids)
        for absorb in (True, False):
            cache = tiny.new_cache(2, 32)
            parts = [tiny(ids[:, :11], 0, cache, absorb=absorb), tiny(ids[:, 11:20], 11, cache, absorb=absorb)]
            parts += [tiny(ids[:, t:t + 1], t, cache, absorb=absorb) for t in range(20, 30)]
            torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_future_tokens_never_change_past_logits(tiny):
    a = torch.randint(0, TINY.vocab_size, (1, 24))
    b = a.clone()
    b[:, 16:] = torch.randint(0, TINY.vocab_size, (1, 8))
    with torch.no_grad():
        past_a, past_b = tiny(a)[:, :16], tiny(b)[:, :16]
    torch.testing.assert_close(past_a, past_b, atol=1e-5, rtol=0)  # float noise only (expert batching)
    with torch.no_grad():
        assert (tiny(a)[:, 16:] - tiny(b)[:, 16:]).abs().max() > 1e-2  # while the future does change


def test_cache_overflow_is_a_clear_error(tiny):
    cache = tiny.new_cache(1, 8)
    with pytest.raises(ValueError, match="cache holds 8 positions"):
        tiny(torch.zeros(1, 9, dtype=torch.long), 0, cache)


@pytest.mark.parametrize("n_tokens", [1, 5, 300])
@pytest.mark.parametrize("grouped", [True, False])  # one grouped_mm, or one matmul per used expert
def test_grouped_experts_equal_reference_loop(tiny, n_tokens, grouped):
    moe = tiny.layers[1].mlp
    x = torch.randn(1, n_tokens, TINY.hidden_size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = moe(x, grouped=grouped)
    load = moe.load.clone()
    y_ref = moe(x_ref, reference=True)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(load, moe.load) and load.sum() == n_tokens * TINY.num_experts_per_tok
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, moe.experts.gate_up_proj, moe.experts.down_proj])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x_ref, moe.experts.gate_up_proj, moe.experts.down_proj])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bucket_rows_bound_the_shapes_and_the_padding():
    sizes = [bucket_rows(r) for r in range(1, 40001)]
    assert all(r <= b <= max(r, 1.25 * r) for r, b in zip(range(1, 40001), sizes))
    assert sizes == sorted(sizes) and all(bucket_rows(b) == b for b in sizes)
    assert len(set(sizes)) <= 8 + 4 * 13  # 1..8 as they are, then four sizes per octave up to 2**16
    assert [bucket_rows(r) for r in (9, 16, 17, 33, 1000, 1025)] == [10, 16, 20, 40, 1024, 1280]


def test_bf16_experts_on_cpu_pad_their_rows_and_equal_the_unpadded_loop(tiny, monkeypatch):
    """bf16 expert matmuls on CPU run on rows padded to `bucket_rows` (oneDNN compiles a kernel per
    shape); output and every gradient equal the same loop without padding."""
    moe = copy.deepcopy(tiny.layers[1].mlp).to(torch.bfloat16)
    x0 = torch.randn(1, 300, TINY.hidden_size, dtype=torch.bfloat16)
    padded = []

    def recording(x, dtype):
        out = rows.pad_rows(x, dtype)
        padded.append((len(x), len(out)))
        return out

    results = []
    for pad in (recording, lambda x, dtype: x):
        monkeypatch.setattr(expert_loop, "pad_rows", pad)  # the training loop's padding, forward and backward
        x = x0.clone().requires_grad_()
        y = moe(x)
        g = torch.autograd.grad(y.float().square().sum(), [x, moe.experts.gate_up_proj, moe.experts.down_proj])
        results.append((y, *g))
    assert any(b > a for a, b in padded) and all(b == bucket_rows(a) for a, b in padded)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def _autograd_expert_loop(experts, x_MD, counts, w_M):
    """The routed experts as plain autograd sees them: one slice of the stacks per expert, each row's
    hidden scaled by its routing weight."""
    out = []
    for e, (x, w) in enumerate(zip(x_MD.split(counts), w_M.split(counts))):
        if len(x):
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up * w[:, None]
            out.append(torch.nn.functional.linear(h, experts.down_proj[e]))
    return torch.cat(out)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_expert_loop_backward_equals_autograd(tiny, autocast, batched):
    """The training products' hand-written backward gives autograd's gradients of x, both stacks and the
    routing weights (experts without rows: zero gradient), in fp32 and under bf16 autocast, in the loop
    over uneven experts and in the batched layout of even ones."""
    experts = copy.deepcopy(tiny.layers[1].mlp.experts)
    E = experts.gate_up_proj.shape[0]
    counts = [0, 60, 64, 0, 57, 63] + [62] * (E - 6) if batched else [0, 5, 1, 0, 40, 3] + [2] * (E - 6)
    assert (expert_loop.batch_rows(counts) is not None) == batched
    torch.manual_seed(0)
    x0 = torch.randn(sum(counts), TINY.hidden_size)
    w0 = torch.rand(sum(counts))
    results = []
    loops = (lambda x, w: experts(x, torch.tensor(counts), w),
             lambda x, w: _autograd_expert_loop(experts, x, counts, w))
    for run in loops:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x_in, w_in = (x.bfloat16(), w.bfloat16()) if autocast else (x, w)  # as MoE casts them on CPU
            y = run(x_in, w_in)
        g = torch.autograd.grad(y.float().square().sum(), [x, w, experts.gate_up_proj, experts.down_proj])
        results.append((y, *g))
    for a, b, name in zip(*results, ("y", "x", "w", "gate_up", "down")):  # (measured: bit-identical on AMX)
        torch.testing.assert_close(a, b, atol=(1e-2 if autocast else 1e-5) * b.abs().max().item(), rtol=0, msg=name)
    for dw in results[0][3:]:  # gate_up, down: zero for the experts without rows
        assert dw[0].abs().sum() == 0 and dw[3].abs().sum() == 0 and dw[1].abs().sum() > 0


def test_reference_model_path_equals_grouped(tiny):
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids, reference=True), tiny(ids), atol=1e-5, rtol=0)


def test_router_bias_steers_selection_not_weights():
    cfg = dataclasses.replace(TINY, n_routed_experts=8, num_experts_per_tok=2)
    logits = torch.randn(5, 8)
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 always chosen
    idx, w = route(logits, bias, cfg)
    assert (idx == 3).any(1).all()
    scores = logits.sigmoid()
    expect = scores.gather(1, idx)
    expect = expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(w, expect)  # unbiased scores, normalised, scaled
    idx0, _ = route(logits, torch.zeros(8), cfg)
    assert set(idx0[0].tolist()) == set(scores[0].topk(2).indices.tolist())


def test_group_limited_routing_keeps_topk_groups():
    cfg = dataclasses.replace(TINY, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    logits = torch.randn(64, 16)
    idx, _ = route(logits, torch.zeros(16), cfg)
    scores = logits.sigmoid().view(64, 4, 4)
    best_groups = scores.topk(2, -1).values.sum(-1).topk(2, -1).indices  # group score: sum of top-2
    for n in range(64):
        assert set((idx[n] // 4).tolist()) <= set(best_groups[n].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, padded, block", [(5, 5, 4), (13, 14, 4), (9, 12, 256), (8, 8, 4), (1, 2, 4)])
def test_causal_max_is_the_max_over_the_causal_triangle(n, padded, block, dtype):
    """QK-Clip's max logit of a run, scored in blocks of query rows (no score above the diagonal blocks
    formed): the masked max of the full product, with the rows padded past n left out even
    where every real score is negative (a padded zero row would otherwise win)."""
    from openk2.model.flash import causal_max
    g = torch.Generator().manual_seed(n + block)
    q, k = (torch.randn(3, padded, 6, generator=g) for _ in range(2))
    q[1], k[1] = q[1].abs(), -k[1].abs()  # head 1: every real score negative
    q, k = q.to(dtype), k.to(dtype)
    q[:, n:], k[:, n:] = 0, 0
    full = (q @ k.transpose(-1, -2))[:, :n, :n]
    expect = full.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).amax(dim=(1, 2))
    assert (expect[1] < 0).item()
    # the same up to the product's rounding (a block's product may sum in another order)
    torch.testing.assert_close(causal_max(q, k, n, block), expect, rtol=1e-6 if dtype == torch.float32 else 0, atol=0)


def test_max_logits_recorded_per_head(tiny):
    ids = torch.randint(0, TINY.vocab_size, (2, 20))
    attn = tiny.layers[0].self_attn
    x = tiny.layers[0].input_layernorm(tiny.model.embed_tokens(ids))
    positions = torch.arange(20)
    from openk2.model.rope import rope_cos_sin
    cos, sin = rope_cos_sin(tiny.inv_freq, positions, tiny.rope_mult)
    with torch.no_grad():  # independent recomputation of Q·Kᵀ·scale over causal positions
        q_nope, q_pe = attn._query(x)
        q_pe = apply_rope(q_pe, cos, sin)
        kv = attn.kv_a_proj_with_mqa(x)
        c, k_pe = attn.kv_a_layernorm(kv[..., :TINY.kv_lora_rank]), apply_rope(kv[..., TINY.kv_lora_rank:], cos, sin)
        k_nope = attn.kv_b_proj(c).view(2, 20, TINY.num_attention_heads, -1)[..., :TINY.qk_nope_head_dim]
        s = (torch.einsum("bshp,bthp->bhst", q_nope, k_nope)
             + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) * attn.softmax_scale
        s = s.masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), float("-inf"))
        expect = s.amax(dim=(0, 2, 3))
    tiny.record_max_logits(True)
    try:
        with torch.no_grad():
            out_rec = tiny(ids)
            got = tiny.max_logits()
            tiny(ids, absorb=True)
            got_absorbed = tiny.max_logits()
    finally:
        tiny.record_max_logits(False)
    assert got.shape == (TINY.num_hidden_layers, TINY.num_attention_heads)
    torch.testing.assert_close(got[0], expect, atol=1e-5, rtol=0)
    # under bf16 the max is taken before the fp32 cast and the scale: exactly the max of the scaled fp32 logits
    scores = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16) * 30
    attn._record(scores, None, True, head_dim=1, scale=attn.softmax_scale)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    full = (scores.float() * attn.softmax_scale).masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3))
    assert attn.max_logits.dtype == torch.float32 and torch.equal(attn.max_logits, full)
    torch.testing.assert_close(got_absorbed, got, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(out_rec, tiny(ids), atol=1e-5, rtol=0)  # recording changes nothing


def test_yarn_numbers_of_k2():
    assert _correction_dim(1.0, 64, 50000.0, 4096) == pytest.approx(19.1646, abs=1e-4)
    plain = 1.0 / 50000.0 ** (torch.arange(0, 64, 2).float() / 64)
    assert plain[[0, 19, 20, 31]].tolist() == pytest.approx([1.0, 1.62176e-3, 1.15649e-3, 2.80461e-5], rel=1e-4)
    inv_freq, mult = rope_inv_freq(KIMI_K2)
    assert mult == 1.0
    torch.testing.assert_close(inv_freq[:20], plain[:20])  # pairs 0-19 keep their frequency
    torch.testing.assert_close(inv_freq[20:], plain[20:] / 32)  # 20-31 divided by the factor
    assert KIMI_K2.softmax_scale == pytest.approx(0.1308608, abs=1e-7)
    assert PRESETS["kimi-k2-0905"].softmax_scale == pytest.approx(0.1446796, abs=1e-7)
    assert dataclasses.replace(KIMI_K2, rope_scaling=None).softmax_scale == pytest.approx(0.0721688, abs=1e-7)


def test_rope_is_complex_rotation_of_interleaved_pairs():
    x = torch.randn(2, 5, 3, 8)
    angles = torch.arange(5).float()[:, None] * torch.tensor([1.0, 0.3, 0.05, 0.001])
    out = apply_rope(x, angles.cos(), angles.sin())
    z = torch.view_as_complex(x.view(2, 5, 3, 4, 2).contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None]
    torch.testing.assert_close(out, torch.view_as_real(z).flatten(-2))


def test_rmsnorm_numerics_bf16():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 16))
    norm = norm.bfloat16()
    x = torch.randn(4, 16).bfloat16()
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    expect = norm.weight * y  # weight applied after the downcast, in bf16
    assert torch.equal(norm(x), expect)


def test_full_k2_on_meta_costs_nothing():
    with torch.device("meta"):
        model = Transformer(KIMI_K2)
    assert count_params(model) == 1_026_408_232_448
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(model.layers) == 61 and not isinstance(model.layers[0].mlp, MoE)
    assert all(isinstance(layer.mlp, MoE) for layer in model.layers[1:])


def test_moonlight_shape_on_meta():
    with torch.device("meta"):
        model = Transformer(PRESETS["moonlight-16b-a3b"])
    attn = model.layers[0].self_attn
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    assert model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (2 * 1408, 2048)


def test_bf16_forward_close_to_fp32(tiny):
    ids = torch.randint(0, TINY.vocab_size, (1, 16))
    with torch.no_grad():
        ref = tiny(ids)
        low = build_model(TINY, dtype=torch.bfloat16, seed=0)
        low.load_state_dict(tiny.state_dict())
        out = low(ids).float()
    assert low.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    # bf16 noise can flip a near-tied expert choice for a token, so bound the mean tightly, the max loosely
    assert (out - ref).abs().mean() < 0.02 * ref.abs().mean()
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
    assert math.isfinite(out.sum().item())


def test_lm_loss_and_backward_reach_every_used_parameter(tiny):
    from openk2.model import lm_loss
    ids = torch.randint(0, TINY.vocab_size, (2, 33))
    targets = ids[:, 1:].clone()
    targets[0, :5] = -100  # ignored positions
    logits = tiny(ids[:, :-1])
    loss = lm_loss(logits, targets)
    keep = targets != -100
    manual = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(loss, manual)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.5  # near-uniform at init
    loss.backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "experts.gate_up_proj" not in name and "experts.down_proj" not in name:
            assert p.grad.abs().sum() > 0, name
    assert tiny.layers[1].mlp.gate.e_score_correction_bias.grad is None  # a buffer: no gradient
    tiny.zero_grad(set_to_none=True)


def test_cast_keeps_router_and_rope_tables_exact(tiny):
    import copy
    from openk2.model.transformer import cast
    low = cast(copy.deepcopy(tiny), torch.bfloat16)
    for name, t in tiny.named_parameters():
        got = dict(low.named_parameters())[name]
        if name.endswith("mlp.gate.weight"):
            assert got.dtype == torch.float32 and torch.equal(got, t), name
        else:
            assert got.dtype == torch.bfloat16 and torch.equal(got, t.bfloat16()), name
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(dict(low.named_buffers())[bias], dict(tiny.named_buffers())[bias])
    assert low.inv_freq.dtype == torch.float32 and torch.equal(low.inv_freq, rope_inv_freq(TINY)[0])


def test_softmax_scoring_weights_are_softmax_probabilities():
    cfg = dataclasses.replace(TINY, n_routed_experts=8, num_experts_per_tok=2, scoring_func="softmax",
                              norm_topk_prob=False, routed_scaling_factor=1.0)
    logits = torch.randn(6, 8)
    idx, w = route(logits, torch.zeros(8), cfg)
    torch.testing.assert_close(w, logits.softmax(-1).gather(1, idx))
    assert set(idx[0].tolist()) == set(logits[0].topk(2).indices.tolist())


def test_unsupported_routing_is_rejected():
    with pytest.raises(ValueError, match="topk_method"):
        dataclasses.replace(TINY, topk_method="greedy")
    with pytest.raises(ValueError, match="scoring_func"):
        dataclasses.replace(TINY, scoring_func="relu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_experts_equal_reference():
    model = build_model(TINY, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    moe = model.layers[1].mlp
    x = torch.randn(1, 300, TINY.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast, ref = moe(x), moe(x, reference=True)
    assert (fast.float() - ref.float()).abs().max() < 2e-2 * ref.float().abs().max()


def test_seq_aux_loss_by_hand_and_its_gradient(tiny):
    from openk2.model.moe import seq_aux_loss
    cfg = dataclasses.replace(TINY, n_routed_experts=4, num_experts_per_tok=2)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]])  # one sequence of 2 tokens
    idx = torch.tensor([[0, 1], [1, 2]])
    s = logits.sigmoid()
    p = (s / s.sum(-1, keepdim=True)).mean(0)
    f = torch.tensor([1.0, 2.0, 1.0, 0.0]) * 4 / (2 * 2)
    torch.testing.assert_close(seq_aux_loss(logits, idx, 1, cfg), (f * p).sum())
    tiny.record_aux_loss(True)
    try:
        tiny(torch.randint(0, TINY.vocab_size, (2, 16)))
        aux = tiny.aux_loss()
        aux.backward()
    finally:
        tiny.record_aux_loss(False)
    assert 0 < aux.item() < 2 * (TINY.num_hidden_layers - 1) * TINY.n_routed_experts
    assert tiny.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_a_chunk_after_its_prefix_equals_the_masked_attention(dtype, tol):
    """`after_prefix` (two fused attentions merged by log-sum-exp) against one masked attention in float64."""
    import torch.nn.functional as F

    from openk2.model.attention import causal_mask
    from openk2.model.flash import after_prefix
    g = torch.Generator().manual_seed(3)
    for S, T in ((2, 3), (7, 19), (64, 200)):
        q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(dtype) for n in (S, T, T))
        expect = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                attn_mask=causal_mask(S, T, T - S, "cpu"), scale=0.3)
        got = after_prefix(q, k, v, 0.3)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expect, atol=tol, rtol=tol)


def test_chunked_prefill_takes_the_split_attention_and_equals_one_pass():
    """A prompt prefilled in chunks (the Engine's way) gives the logits of one pass, its later chunks
    through `after_prefix`."""
    from unittest import mock

    from openk2.model import flash
    model = build_model(PRESETS["k2-tiny"], seed=2).eval()
    ids = torch.randint(0, 500, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model(ids, 0, model.new_cache(1, 23))
        cache = model.new_cache(1, 23)
        with mock.patch.object(flash, "after_prefix", wraps=flash.after_prefix) as split:
            parts = [model(ids[:, s:s + 8], s, cache) for s in (0, 8, 16)]
    assert split.call_count == 2 * PRESETS["k2-tiny"].num_hidden_layers  # the second and third chunks
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
