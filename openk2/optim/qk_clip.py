"""QK-Clip, the clip half of MuonClip (K2-SPEC §7.2): rescale a head's query/key weights after the
optimizer step when its largest attention logit exceeded τ.

Per head h, from S_max^h (the largest pre-softmax logit, softmax scale included, over the step's
batch): γ_h = min(1, τ / S_max^h). MLA splits a head's logit into a no-rope term q_nope·k_nope and a
rotary term q_rope·k_rope, with k_rope one key *shared by all heads*; scaling q_nope and k_nope rows by
sqrt(γ_h) and q_rope rows by γ_h scales both terms of head h by γ_h without touching the shared key,
so no other head moves. Only heads with S_max^h > τ are written. Nothing here runs in the forward:
attention records `max_logits` when asked (`model.record_max_logits(True)`), the loop calls
`apply_qk_clip(model, reduce_max_logits(model.max_logits()), tau)` after `optimizer.step()`.

    L layers  H heads  P no-rope qk head dim  R rotary dim  O value head dim  C kv latent rank
"""

import torch
import torch.distributed as dist
from torch import nn

from openk2.optim.muon import local_part, row_block

TAU = 100.0  # K2's threshold (K2-SPEC §7.2)


def qk_clip_factors(max_logits_H: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """γ_H = min(1, τ / S_max), fp32; exactly 1 where S_max ≤ τ (also for -inf or NaN maxima)."""
    s = max_logits_H.float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


def reduce_max_logits(max_logits_LH: torch.Tensor, group=None) -> torch.Tensor:
    """Max-reduce [L, H] over data-parallel ranks, so every rank clips the same heads; a no-op (the
    same tensor) without torch.distributed or at world size 1."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        max_logits_LH = max_logits_LH.clone()
        dist.all_reduce(max_logits_LH, op=dist.ReduceOp.MAX, group=group)
    return max_logits_LH


@torch.no_grad()
def clip_mla_heads(attn: nn.Module, gamma_H: torch.Tensor) -> int:
    """Rescale one MLA layer's per-head q/k rows in place by γ_H; returns the number of heads clipped.

    On HF tensors (as Megatron-LM `clip_qk`, α = 0.5):
    - `q_b_proj` [H·(P+R), Q] (or `q_proj` [H·(P+R), D] when q_lora_rank is null) viewed [H, P+R, ·]:
      rows :P (q_nope) × sqrt(γ_h), rows P: (q_rope) × γ_h;
    - `kv_b_proj` [H·(P+O), C] viewed [H, P+O, C]: rows :P (k_nope) × sqrt(γ_h); the value rows P: are
      untouched (they are not in the logit);
    - `kv_a_proj_with_mqa` (latent and the shared rotary key, rows C:), `q_a_proj` and the norms: untouched.
    """
    cfg = attn.cfg
    heads = (gamma_H < 1).nonzero().flatten()
    if heads.numel() == 0:
        return 0
    H, P, R, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    g = gamma_H.float()[:, None]  # fp32: rescale in fp32, round once to the weight dtype
    q_scale = torch.cat([g.sqrt().expand(H, P), g.expand(H, R)], 1).flatten()  # per row of w_q
    kv_scale = torch.cat([g.sqrt().expand(H, P), torch.ones(H, V, device=g.device)], 1).flatten()  # kv_b_proj's
    _scale_rows((attn.q_b_proj if cfg.q_lora_rank else attn.q_proj).weight, q_scale)
    _scale_rows(attn.kv_b_proj.weight, kv_scale)
    return heads.numel()


def _scale_rows(w: torch.Tensor, scale_R: torch.Tensor) -> None:
    """w[r] *= scale_R[r] for the rows with a scale below 1, in place; every other row untouched (bit
    for bit). A DTensor sharded by rows (FSDP2: torch.chunk's blocks over its mesh) scales the rows
    this rank holds."""
    local, (first, _, _) = local_part(w), row_block(w)
    rows = (scale_R[first:first + local.shape[0]] < 1).nonzero().flatten()
    local[rows] = (local[rows] * scale_R[first + rows, None]).to(local.dtype)


def apply_qk_clip(model: nn.Module, max_logits_LH: torch.Tensor, tau: float = TAU) -> int:
    """QK-Clip every layer of a Transformer from its recorded [L, H] max logits, in place.

    Returns the number of (layer, head) pairs clipped. Under data parallelism pass the max-reduced
    logits (`reduce_max_logits`) so that the replicas stay identical.
    """
    return sum(clip_mla_heads(layer.self_attn, qk_clip_factors(s_H, tau))
               for layer, s_H in zip(model.layers, max_logits_LH, strict=True))
