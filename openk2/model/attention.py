"""Multi-head Latent Attention (MLA), K2-SPEC §3.2-3.3.

Two paths over the same weights, chosen by the `absorb` argument:
- materialised: expand the latent through kv_b_proj into per-head K/V and run
  scaled_dot_product_attention (training, prefill);
- absorbed: keep only the normalised C-d latent and the R-d rotary key per token and fold
  kv_b_proj into the query (W_UK) and the output (W_UV) (decode; what `LatentCache` stores).
tests/test_model.py binds the two. When `record_max_logits` is set, the largest pre-softmax logit
(softmax scale included, masked positions excluded) per head is kept in `max_logits` for QK-Clip.

    B batch  S query positions  T key positions  D hidden  H heads  Q q latent rank
    C kv latent rank  P no-rope qk head dim  R rotary dim  O value head dim
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model.norm import RMSNorm
from openk2.model.rope import apply_rope


@dataclass
class LatentCache:
    """One layer's cache: normalised latent kv [B, T_max, C] and roped shared key pe [B, T_max, R]."""
    kv: torch.Tensor
    pe: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, device=None) -> "LatentCache":
        return cls(torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device))


def causal_mask(S: int, T: int, start_pos: int, device) -> torch.Tensor:
    """[S, T] bool, True where query s (at position start_pos + s) may see key t."""
    q_pos = torch.arange(start_pos, start_pos + S, device=device)
    return torch.arange(T, device=device)[None, :] <= q_pos[:, None]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D, C, R = cfg.num_attention_heads, cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as the reference, not rms_norm_eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + R, bias=False)
        self.kv_a_layernorm = RMSNorm(C)
        self.kv_b_proj = nn.Linear(C, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        self.softmax_scale = cfg.softmax_scale
        self.record_max_logits = False
        self.max_logits: torch.Tensor | None = None  # [H], set by a forward when recording

    def _query(self, x_BSD):
        B, S, _ = x_BSD.shape
        if self.cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        else:
            q = self.q_proj(x_BSD)
        q_BSHK = q.view(B, S, self.cfg.num_attention_heads, self.cfg.qk_head_dim)
        return q_BSHK.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)

    def forward(self, x_BSD, cos, sin, cache: LatentCache | None = None, start_pos: int = 0,
                absorb: bool = False):
        B, S, _ = x_BSD.shape
        C = self.cfg.kv_lora_rank
        q_nope_BSHP, q_pe_BSHR = self._query(x_BSD)
        q_pe_BSHR = apply_rope(q_pe_BSHR, cos, sin)
        kv_BSc = self.kv_a_proj_with_mqa(x_BSD)
        kv_BTC = self.kv_a_layernorm(kv_BSc[..., :C])
        pe_BTR = apply_rope(kv_BSc[..., C:], cos, sin)
        if cache is not None:
            cache.kv[:B, start_pos:start_pos + S] = kv_BTC
            cache.pe[:B, start_pos:start_pos + S] = pe_BTR
            kv_BTC, pe_BTR = cache.kv[:B, :start_pos + S], cache.pe[:B, :start_pos + S]
        mask_ST = None
        if start_pos or kv_BTC.shape[1] != S:
            mask_ST = causal_mask(S, kv_BTC.shape[1], start_pos, x_BSD.device)
        if absorb:
            out_BSHO = self._absorbed(q_nope_BSHP, q_pe_BSHR, kv_BTC, pe_BTR, mask_ST)
        else:
            out_BSHO = self._materialised(q_nope_BSHP, q_pe_BSHR, kv_BTC, pe_BTR, mask_ST)
        return self.o_proj(out_BSHO.flatten(2))

    def _materialised(self, q_nope_BSHP, q_pe_BSHR, kv_BTC, pe_BTR, mask_ST):
        cfg = self.cfg
        B, T, _ = kv_BTC.shape
        H, P = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kv_BTHx = self.kv_b_proj(kv_BTC).view(B, T, H, P + cfg.v_head_dim)
        k_nope_BTHP, v_BTHO = kv_BTHx.split([P, cfg.v_head_dim], dim=-1)
        k_BTHK = torch.cat([k_nope_BTHP, pe_BTR[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)
        q_BHSK = torch.cat([q_nope_BSHP, q_pe_BSHR], dim=-1).transpose(1, 2)
        k_BHTK, v_BHTO = k_BTHK.transpose(1, 2), v_BTHO.transpose(1, 2)
        if self.record_max_logits:
            scores_BHST = (q_BHSK @ k_BHTK.transpose(-1, -2)).float() * self.softmax_scale
            probs_BHST = self._softmax_recording(scores_BHST, mask_ST, head_dim=1)
            out_BHSO = probs_BHST.to(v_BHTO.dtype) @ v_BHTO
        else:
            out_BHSO = F.scaled_dot_product_attention(
                q_BHSK, k_BHTK, v_BHTO, attn_mask=mask_ST, is_causal=mask_ST is None,
                scale=self.softmax_scale)
        return out_BHSO.transpose(1, 2)

    def _absorbed(self, q_nope_BSHP, q_pe_BSHR, kv_BTC, pe_BTR, mask_ST):
        cfg = self.cfg
        H, P = cfg.num_attention_heads, cfg.qk_nope_head_dim
        wkv_b_HxC = self.kv_b_proj.weight.view(H, P + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk_HPC, w_uv_HOC = wkv_b_HxC[:, :P], wkv_b_HxC[:, P:]
        q_lat_BSHC = torch.einsum("bshp,hpc->bshc", q_nope_BSHP, w_uk_HPC)
        scores_BSHT = (torch.einsum("bshc,btc->bsht", q_lat_BSHC, kv_BTC)
                       + torch.einsum("bshr,btr->bsht", q_pe_BSHR, pe_BTR)).float() * self.softmax_scale
        if mask_ST is None:
            S = scores_BSHT.shape[1]
            mask_ST = causal_mask(S, S, 0, scores_BSHT.device)
        mask_S1T = mask_ST[:, None, :]
        if self.record_max_logits:
            probs_BSHT = self._softmax_recording(scores_BSHT, mask_S1T, head_dim=2)
        else:
            probs_BSHT = scores_BSHT.masked_fill(~mask_S1T, float("-inf")).softmax(-1)
        o_lat_BSHC = torch.einsum("bsht,btc->bshc", probs_BSHT.to(kv_BTC.dtype), kv_BTC)
        return torch.einsum("bshc,hoc->bsho", o_lat_BSHC, w_uv_HOC)

    def _softmax_recording(self, scores, mask, head_dim: int):
        """Softmax over the last dim, keeping the per-head max of the unmasked fp32 logits."""
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            S, T = scores.shape[-2:]
            scores = scores.masked_fill(~causal_mask(S, T, T - S, scores.device), float("-inf"))
        other = [d for d in range(scores.dim()) if d != head_dim]
        self.max_logits = scores.detach().amax(dim=other)
        return scores.softmax(-1)
