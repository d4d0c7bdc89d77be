"""The K2 decoder: pre-norm blocks (MLA + dense MLP or MoE), final norm, untied LM head, loss.

Module names are Hugging Face's (`model.layers.N.self_attn.kv_b_proj`, `mlp.gate.e_score_correction_bias`),
so the state dict *is* the checkpoint layout except for the stacked routed experts, which
`openk2.checkpoint` splits and joins. Construct on the `meta` device for free (the full 1.04T config
costs no memory), then `to_empty()` + `init_weights()` or load a checkpoint. `Transformer.decode` is
one decode step over a pool of cache rows in the form torch.compile fuses (openk2.engine compiles
it), beside its reference `decode_reference` (the same step through `forward`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model.attention import MLA, LatentCache, Packed
from openk2.model.head_loss import linear_cross_entropy
from openk2.model.linear import decode_linear
from openk2.model.moe import MLP, MoE, small_batch
from openk2.model.norm import RMSNorm
from openk2.model.rows import matmul_dtype, pad_rows
from openk2.model.rope import rope_cos_sin, rope_inv_freq


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None, start_pos=0, absorb=False, reference=False, packed=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, absorb, packed)
        y = self.post_attention_layernorm(h)
        return h + (self.mlp(y, reference) if isinstance(self.mlp, MoE) else self.mlp(y))

    def decode(self, x_ND, cos, sin, pool_ZL, slots_NT, pos_N, small: bool):
        h_ND = x_ND + self.self_attn.decode(self.input_layernorm(x_ND), cos, sin, pool_ZL, slots_NT, pos_N, small)
        return h_ND + self.mlp.decode(self.post_attention_layernorm(h_ND), small)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(cfg.qk_rope_head_dim // 2), persistent=False)
        self.rope_mult = 1.0
        self.init_buffers()

    @property
    def layers(self):
        return self.model.layers

    def init_buffers(self):
        """Recompute non-persistent buffers (after `to_empty()` they hold garbage)."""
        if self.inv_freq.device.type != "meta":
            inv_freq, self.rope_mult = rope_inv_freq(self.cfg)
            self.inv_freq.copy_(inv_freq)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """All initialisation, in one place.

        - every Linear, stacked expert weight and the router: N(0, initializer_range)
        - embed_tokens: N(0, initializer_range)
        - RMSNorm weights: 1; e_score_correction_bias: 0
        """
        gen = torch.Generator(device=self.inv_freq.device).manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        self.init_buffers()
        return self

    def new_cache(self, batch: int, max_len: int, dtype=None) -> list[LatentCache]:
        dtype = dtype or self.lm_head.weight.dtype
        return [LatentCache.empty(self.cfg, batch, max_len, dtype, self.lm_head.weight.device)
                for _ in self.layers]

    def forward(self, input_ids, start_pos: int | torch.Tensor = 0, cache: list[LatentCache] | None = None,
                absorb: bool | None = None, reference: bool = False, segment_ids: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        """Logits [B, S, V] for input_ids [B, S] at positions start_pos.. (fp32 or model dtype);
        start_pos per row (LongTensor [B]) lets rows of different lengths decode in one batch.

        absorb: MLA path; default absorbed for decode steps (a cache and S == 1), else materialised.
        reference: run routed experts through the per-expert reference loop.
        segment_ids [B, S]: packed rows (SFT); each run of equal ids is one sequence, attending only
        to itself, its positions counted from 0. Without a cache; None: the plain causal path.
        keep [B, S] bool: logits [M, V] of the kept positions only (training: those with a target; SFT
        keeps ~10 %, and the vocabulary projection and softmax are a large share of a small model's step).
        targets [B, S] (shifted; -100 where none): the mean cross entropy instead of logits, from the
        vocabulary projection and softmax fused by row chunks (`head_loss`; the same loss as `lm_loss`).
        """
        B, S = input_ids.shape
        if segment_ids is not None:
            return self._head(self._packed(input_ids, segment_ids, absorb or False, reference), keep, targets)
        per_row = isinstance(start_pos, torch.Tensor)
        if per_row and cache is None:
            raise ValueError("per-row start positions need a cache")
        end = int(start_pos.max()) + S if per_row else start_pos + S
        if cache is not None and end > cache[0].ckv.shape[1]:
            raise ValueError(f"cache holds {cache[0].ckv.shape[1]} positions, need {end}")
        absorb = (cache is not None and S == 1) if absorb is None else absorb
        positions = (start_pos[:, None] if per_row else start_pos) + torch.arange(S, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_mult, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache[i] if cache is not None else None, start_pos, absorb, reference)
        return self._head(x, keep, targets)

    def _head(self, x_BSD, keep_BS: torch.Tensor | None, targets_BS: torch.Tensor | None = None):
        if targets_BS is not None:  # the loss, of the positions with a target only (normed, projected)
            keep_BS = targets_BS != -100
            x_MD, t_M = ((x_BSD.flatten(0, 1), targets_BS.flatten()) if bool(keep_BS.all())
                         else (x_BSD[keep_BS], targets_BS[keep_BS]))
            return linear_cross_entropy(self.model.norm(x_MD), self.lm_head.weight, t_M)
        if keep_BS is None:
            return self.lm_head(self.model.norm(x_BSD))
        x_MD = x_BSD[keep_BS]  # a count that changes every step: padded for CPU's matmul (pad_rows)
        return self.lm_head(self.model.norm(pad_rows(x_MD, matmul_dtype(x_MD))))[:x_MD.shape[0]]

    # --- one decode step over a pool of cache rows: the compiled form and its reference ----------
    def decode(self, ids_N, pos_N, slots_NT, pools_ZL: list[torch.Tensor]):
        """Logits [N, V] for tokens ids_N at positions pos_N, one per row, written for torch.compile
        (`MLA.decode`, `MoE.decode`: no data-dependent shapes, multiply-and-reduce at small batches).
        Row n's cache rows for positions 0..T-1 are pools_ZL[layer][slots_NT[n]] (an engine's block
        pool; rows past pos_N[n] are ignored); the new rows are written there. `decode_reference`
        computes the same through `forward` (tests/test_decode.py)."""
        small = small_batch(ids_N.shape[0], self.cfg)
        x_ND = self.model.embed_tokens(ids_N)
        cos, sin = rope_cos_sin(self.inv_freq, pos_N[:, None], self.rope_mult, x_ND.dtype)
        for layer, pool_ZL in zip(self.layers, pools_ZL):
            x_ND = layer.decode(x_ND, cos, sin, pool_ZL, slots_NT, pos_N, small)
        return decode_linear(self.lm_head, self.model.norm(x_ND), small)

    def decode_reference(self, ids_N, pos_N, slots_NT, pools_ZL: list[torch.Tensor]):
        """What `decode` computes, through `forward`: gather each row's cache, run the absorbed path
        at per-row positions, write the new rows back."""
        caches = [LatentCache(pool_ZL[slots_NT]) for pool_ZL in pools_ZL]
        logits_N1V = self(ids_N[:, None], pos_N, caches)
        new_N = slots_NT.gather(1, pos_N[:, None])[:, 0]
        rows_N = torch.arange(ids_N.shape[0], device=ids_N.device)
        for pool_ZL, cache in zip(pools_ZL, caches):
            pool_ZL[new_N] = cache.ckv[rows_N, pos_N]
        return logits_N1V[:, -1]

    def _packed(self, input_ids, segment_ids_BS, absorb: bool, reference: bool):
        B, S = input_ids.shape
        if segment_ids_BS.shape != input_ids.shape:
            raise ValueError(f"segment_ids {tuple(segment_ids_BS.shape)} must match input_ids {(B, S)}")
        idx_S = torch.arange(S, device=input_ids.device)
        starts_BS = torch.ones_like(segment_ids_BS, dtype=torch.bool)
        starts_BS[:, 1:] = segment_ids_BS[:, 1:] != segment_ids_BS[:, :-1]
        # a position's offset in its segment: its index minus that of the latest segment start
        positions_BS = idx_S - torch.where(starts_BS, idx_S, 0).cummax(dim=1).values
        start_N = starts_BS.flatten().nonzero().flatten().tolist() + [B * S]
        packed = Packed(tuple(b - a for a, b in zip(start_N, start_N[1:])), (B, S))
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions_BS, self.rope_mult, x.dtype)
        moes = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
        try:  # padding (segment 0) is routed too, but not counted in the loads that balancing reads
            for moe in moes:
                moe.counted = (segment_ids_BS != 0).flatten()
            for layer in self.layers:
                x = layer(x, cos, sin, None, 0, absorb, reference, packed)
        finally:
            for moe in moes:
                moe.counted = None
        return x

    # --- diagnostics for training (QK-Clip, balancing) -------------------------------------------
    def record_max_logits(self, on: bool = True):
        for layer in self.layers:
            layer.self_attn.record_max_logits = on

    def max_logits(self) -> torch.Tensor:
        """[L, H] per-layer, per-head max pre-softmax logit of the last recorded forward."""
        return torch.stack([layer.self_attn.max_logits for layer in self.layers])

    def record_aux_loss(self, on: bool = True):
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.record_aux_loss = on

    def aux_loss(self) -> torch.Tensor:
        """Sum over MoE layers of the sequence-wise balance loss of the last recorded forward."""
        return sum(layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoE))

    def expert_load(self) -> dict[int, torch.Tensor]:
        """{layer: tokens per routed expert [E]} of the last forward."""
        return {i: layer.mlp.load for i, layer in enumerate(self.layers) if isinstance(layer.mlp, MoE)}


def lm_loss(logits_BSV, targets_BS, ignore_index: int = -100):
    """Mean next-token cross entropy in fp32; targets are already shifted. Logits [B, S, V] with targets
    [B, S], or the kept rows [M, V] (`forward(keep=)`) with theirs [M]."""
    logits_NV = logits_BSV.float().reshape(-1, logits_BSV.shape[-1])
    return F.cross_entropy(logits_NV, targets_BS.reshape(-1), ignore_index=ignore_index)


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int | None = 0) -> Transformer:
    """A randomly initialised model: constructed on meta, materialised once on `device`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return cast(model.to_empty(device=device), dtype).init_weights(seed)


FP32_TENSORS = ("mlp.gate.weight", "e_score_correction_bias", "inv_freq")


def cast(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Model weights to `dtype`; routers (gate weight, correction bias) and rope tables stay fp32.

    The router runs in fp32 (as the reference does); holding its small weight in fp32 saves an
    upcast per forward, and the correction bias is accumulated in small steps by balancing.
    Tensor by tensor, so the fp32 ones are never rounded on the way.
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.float() if name.endswith(FP32_TENSORS) else t.data.to(dtype)
    return model


def count_params(model: nn.Module) -> int:
    """Parameters plus the router correction biases (buffers that checkpoints carry)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
