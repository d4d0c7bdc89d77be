"""The decode step written for the compiler: one new token per running request, attending straight
from the engine's block pool.

`Transformer.forward` on a latent cache is the reference; tests/test_decode.py binds the two. This is
the same math (absorbed MLA, noaux_tc routing, SwiGLU experts) re-expressed so that torch.compile
(inductor) turns a whole step into a few dozen fused loops instead of ~10³ library calls, which is
what eager decode on a CPU pays for (per-op overhead and ~30 µs per small bf16 matmul call):
- no data-dependent shapes: attention reads the pool rows of each request through a slot table
  (a gather inductor fuses into the score loop, so no per-step copy of the cache), the new row is
  written in place, and masking replaces slicing;
- at tiny batches every matmul is multiply-and-reduce (`_matvec`) and the routed experts are read
  only for the chosen (token, expert) pairs: bandwidth-bound loops over the weights;
- at larger batches linears are matmuls and the experts run densely over all E experts weighted by
  the (mostly zero) routing weights: every expert is read once anyway when N·K ≫ E, and
  weight-first batched matmuls reach the machine's bandwidth.
int8 weights (openk2.quant) take the small-batch forms too, widened inside the loop. Run eagerly, the
multiply-and-reduce forms would materialise huge products: `CompiledDecode` runs this through
torch.compile, and `reference_step` (the model's own forward) where it cannot.

    N rows (requests)  T cache positions  P pool rows  D hidden  H heads  C latent rank
    R rotary dim  L = C + R  E experts  K experts per token  F expert hidden  M = N·K pairs
"""

import contextlib
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.attention import MLA, LatentCache
from openk2.model.moe import MLP, MoE, Experts, route
from openk2.model.rope import apply_rope, rope_cos_sin
from openk2.model.transformer import Transformer
from openk2.quant import QuantizedExperts
from openk2.quant.int4 import Int4Linear
from openk2.quant.int8 import Int8Linear


def _matvec(x_NI: torch.Tensor, w_OI: torch.Tensor, scale_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ as a fused multiply-and-reduce, in fp32 (w may be int8 codes, widened inside the loop,
    with their row scale applied after the sum; w may also be [N, O, I], one matrix per row)."""
    y_NO = (x_NI[:, None, :] * w_OI).sum(-1, dtype=torch.float32)
    return y_NO if scale_O is None else y_NO * scale_O.float()


def small_batch(rows: int, cfg) -> bool:
    """Few enough rows that the chosen (token, expert) pairs read less than half of the experts:
    multiply-and-reduce everywhere. Above it, library matmuls and dense experts."""
    return rows * cfg.num_experts_per_tok <= cfg.n_routed_experts // 2


def _linear(mod: nn.Module, x_NI: torch.Tensor, small: bool) -> torch.Tensor:
    if not small:  # weight-first (W @ xᵀ): oneDNN streams the weight faster this way round
        return torch.mm(mod.weight, x_NI.T).T if type(mod) is nn.Linear else mod(x_NI)
    scale = mod.weight_scale if isinstance(mod, Int8Linear) else None
    return _matvec(x_NI, mod.weight, scale).to(x_NI.dtype)


def _mlp(mlp: MLP, x_ND: torch.Tensor, small: bool) -> torch.Tensor:
    h = F.silu(_linear(mlp.gate_proj, x_ND, small)) * _linear(mlp.up_proj, x_ND, small)
    return _linear(mlp.down_proj, h, small)


def _experts_pairs(experts: Experts | QuantizedExperts, x_ND, idx_NK, w_NK):
    """Only the chosen experts' weights, one multiply-and-reduce per (token, expert) pair (int8
    experts: their stacked codes, scaled per row after the sum)."""
    N, K = idx_NK.shape
    flat_M = idx_NK.flatten()
    x_MD = x_ND.repeat_interleave(K, 0)
    if isinstance(experts, QuantizedExperts):
        gate_up, gate_up_scale, down, down_scale = (t[flat_M] for t in experts.stacked)
    else:
        gate_up, gate_up_scale, down, down_scale = experts.gate_up_proj[flat_M], None, experts.down_proj[flat_M], None
    gate, up = _matvec(x_MD, gate_up, gate_up_scale).chunk(2, -1)
    h_MF = (F.silu(gate) * up * w_NK.flatten()[:, None]).to(x_ND.dtype)
    return _matvec(h_MF, down, down_scale).view(N, K, -1).sum(1).to(x_ND.dtype)


def _experts_dense(experts: Experts, x_ND, idx_NK, w_NK):
    """Every expert on every row, weighted by the dense routing weights (zero where not chosen)."""
    (N, D), E = x_ND.shape, experts.gate_up_proj.shape[0]
    w_NE = torch.zeros(N, E, dtype=w_NK.dtype, device=x_ND.device).scatter(1, idx_NK, w_NK)
    # weight-first batched matmuls, as `_linear`
    gate, up = torch.bmm(experts.gate_up_proj, x_ND.T.expand(E, D, N)).chunk(2, 1)  # [E, F, N] each
    h_EFN = (F.silu(gate.float()) * up.float() * w_NE.T[:, None, :]).to(x_ND.dtype)
    return torch.matmul(experts.down_proj, h_EFN).sum(0, dtype=torch.float32).T.to(x_ND.dtype)


def _moe(moe: MoE, x_ND: torch.Tensor, small: bool) -> torch.Tensor:
    logits_NE = F.linear(x_ND.float(), moe.gate.weight.float())
    idx_NK, w_NK = route(logits_NE, moe.gate.e_score_correction_bias.float(), moe.cfg)
    y_ND = (_experts_pairs if small else _experts_dense)(moe.experts, x_ND, idx_NK, w_NK)
    return y_ND + _mlp(moe.shared_experts, x_ND, small) if moe.shared_experts is not None else y_ND


def _attention(attn: MLA, x_ND, cos, sin, pool_PL, slots_NT, pos_N, small: bool):
    """Absorbed MLA for one new token per row; writes the row's latent into the pool first."""
    cfg = attn.cfg
    N = x_ND.shape[0]
    H, P, R, C, O = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.kv_lora_rank, cfg.v_head_dim)
    if cfg.q_lora_rank:
        q = _linear(attn.q_b_proj, attn.q_a_layernorm(_linear(attn.q_a_proj, x_ND, small)), small)
    else:
        q = _linear(attn.q_proj, x_ND, small)
    q_nope_NHP, q_pe_NHR = q.view(N, H, P + R).split([P, R], -1)
    q_pe_NHR = apply_rope(q_pe_NHR[:, None], cos, sin)[:, 0]
    kv_NL = _linear(attn.kv_a_proj_with_mqa, x_ND, small)
    row_NL = torch.cat([attn.kv_a_layernorm(kv_NL[:, :C]), apply_rope(kv_NL[:, None, C:], cos, sin)[:, 0]], -1)
    pool_PL.index_put_((slots_NT.gather(1, pos_N[:, None])[:, 0],), row_NL)
    ckv_NTL = pool_PL[slots_NT]
    w_HYC = attn.kv_b_proj.weight.view(H, P + O, C)
    q_lat_NHC = (q_nope_NHP[..., None] * w_HYC[:, :P]).sum(-2, dtype=torch.float32).to(x_ND.dtype)
    q_NHL = torch.cat([q_lat_NHC, q_pe_NHR], -1)
    scores_NHT = (q_NHL[:, :, None, :] * ckv_NTL[:, None]).sum(-1, dtype=torch.float32) * attn.softmax_scale
    visible_NT = torch.arange(slots_NT.shape[1], device=x_ND.device) <= pos_N[:, None]
    probs_NHT = scores_NHT.masked_fill(~visible_NT[:, None], float("-inf")).softmax(-1)
    # a library matmul (fp32: no rounding of the probabilities, and MKL's small-matrix kernel is the
    # fastest here), not multiply-and-reduce, which the compiler would fuse with the softmax and then
    # recompute each probability (an exp) once per latent channel
    o_lat_NHC = torch.bmm(probs_NHT, ckv_NTL[..., :C].float()).to(x_ND.dtype)
    out_NHO = (o_lat_NHC[:, :, None, :] * w_HYC[:, P:]).sum(-1, dtype=torch.float32)
    return _linear(attn.o_proj, out_NHO.to(x_ND.dtype).flatten(1), small)


def decode_step(model: Transformer, ids_N, pos_N, slots_NT, pools_PL: list[torch.Tensor]):
    """Logits [N, V] for token ids_N at positions pos_N; request n's cache rows for positions
    0..T-1 are pools_PL[layer][slots_NT[n]] (rows past pos_N[n] are ignored). Writes the new rows."""
    small = small_batch(ids_N.shape[0], model.cfg)
    x_ND = model.model.embed_tokens(ids_N)
    cos, sin = rope_cos_sin(model.inv_freq, pos_N[:, None], model.rope_mult, x_ND.dtype)
    for layer, pool_PL in zip(model.layers, pools_PL):
        attn_in = layer.input_layernorm(x_ND)
        x_ND = x_ND + _attention(layer.self_attn, attn_in, cos, sin, pool_PL, slots_NT, pos_N, small)
        y_ND = layer.post_attention_layernorm(x_ND)
        x_ND = x_ND + (_moe(layer.mlp, y_ND, small) if isinstance(layer.mlp, MoE) else _mlp(layer.mlp, y_ND, small))
    return _linear(model.lm_head, model.model.norm(x_ND), small)


def compilable(model: Transformer) -> bool:
    """Whether the step can read this model's weights as tensors: float or int8 (Int8Linear, int8
    QuantizedExperts), not int4 (whose CPU kernel layout is opaque)."""
    return not any(isinstance(m, Int4Linear) or (isinstance(m, QuantizedExperts) and m.stacked is None)
                   for m in model.modules())


@contextlib.contextmanager
def decode_kernels(model: Transformer, rows: int):
    """Matmul kernels for a decode step of `rows` tokens.

    On CPU, oneDNN's bf16/fp16 matmul costs ~30 µs a call whatever its size, while ATen's own kernel
    takes ~11 µs for a single row (and far longer for many): one- or two-row decode steps, where
    every matmul is a matrix-vector product, run without oneDNN (bench/forward.py measures it).
    The switch is process-wide (`torch.backends.mkldnn.enabled`): not for concurrent threads.
    """
    w = model.lm_head.weight
    off = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and rows <= 2
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError,
                  torch._inductor.exc.CppCompileError)


class CompiledDecode:
    """`decode_step` through torch.compile, for one model. Shapes are symbolic (any batch, any cache
    length); a graph is compiled on first use per regime (one row, `small_batch`, larger) — tens of
    seconds each on a small CPU, and inductor keeps the generated code on disk for later processes.
    If compiling fails (no C++ compiler, say), it warns once and runs the reference instead."""

    def __init__(self, model: Transformer):
        if not compilable(model):
            raise ValueError("the compiled decode step needs float or int8 weights (int4 runs eagerly)")
        self.model, self.failed = model, False
        # int8 compiles for small batches only, where its fused int8 loops win; larger batches keep
        # the int8 modules' own kernels (the reference step)
        self.int8 = any(isinstance(m, (Int8Linear, QuantizedExperts)) for m in model.modules())
        self._fn = torch.compile(decode_step, dynamic=True)

    def warm(self, batch_sizes, progress=None) -> None:
        """Compile now the graph of each of `batch_sizes` (one per regime), running each once on a
        scratch cache of its own: no engine state is touched, so this may run on a thread beside an
        engine that decodes eagerly meanwhile. progress(message) hears of each graph as it is ready."""
        cfg, w = self.model.cfg, self.model.lm_head.weight
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        for n in batch_sizes:
            if self.failed or (self.int8 and not small_batch(n, cfg)):
                continue  # nothing to compile (and the reference step flips a process-wide flag)
            t0 = time.perf_counter()
            # made as the engine makes its own (the pool outside inference mode, the step's inputs
            # inside), so that the graphs' guards match the engine's calls
            pools = [torch.zeros(2 * n + 3, width, dtype=w.dtype, device=w.device)
                     for _ in range(cfg.num_hidden_layers)]
            with torch.inference_mode():
                ids = torch.zeros(n, dtype=torch.long, device=w.device)
                pos = torch.ones(n, dtype=torch.long, device=w.device)  # two positions a row, as in the
                slots = torch.arange(2 * n, device=w.device).view(n, 2)  # step after a one-token prompt
                self(ids, pos, slots, pools)
            if progress:
                progress(f"decode step compiled for {n} row{'s' * (n > 1)} ({time.perf_counter() - t0:.0f} s)")

    def __call__(self, ids_N, pos_N, slots_NT, pools_PL):
        if not self.failed and (not self.int8 or small_batch(ids_N.shape[0], self.model.cfg)):
            try:
                return self._fn(self.model, ids_N, pos_N, slots_NT, pools_PL)
            except COMPILE_ERRORS as e:  # the compiler's own failure (errors at run time propagate)
                warnings.warn(f"torch.compile failed, decoding eagerly: {type(e).__name__}: {e}")
                self.failed = True  # the reference rewrites any pool rows a partial run wrote
        with decode_kernels(self.model, ids_N.shape[0]):
            return reference_step(self.model, ids_N, pos_N, slots_NT, pools_PL)


def reference_step(model: Transformer, ids_N, pos_N, slots_NT, pools_PL):
    """What `decode_step` computes, through `Transformer.forward`: gather each row's cache, run the
    absorbed path at per-row positions, write the new rows back."""
    caches = [LatentCache(pool_PL[slots_NT]) for pool_PL in pools_PL]
    logits_N1V = model(ids_N[:, None], pos_N, caches)
    new_N = slots_NT.gather(1, pos_N[:, None])[:, 0]
    rows_N = torch.arange(ids_N.shape[0], device=ids_N.device)
    for pool_PL, cache in zip(pools_PL, caches):
        pool_PL[new_N] = cache.ckv[rows_N, pos_N]
    return logits_N1V[:, -1]
