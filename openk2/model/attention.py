"""Multi-head Latent Attention (MLA), K2-SPEC §3.2-3.3.

Two paths over the same weights, chosen by the `absorb` argument:
- materialised: expand the latent through kv_b_proj into per-head K/V and run
  scaled_dot_product_attention (training, prefill; training's causal rows and packed runs on a CPU
  with AMX tiles take openk2's kernel instead, `flash.by_runs`);
- absorbed: keep only the normalised C-d latent and the R-d rotary key per token and fold
  kv_b_proj into the query (W_UK) and the output (W_UV) (decode; what `LatentCache` stores).
tests/test_model.py binds the two. `MLA.decode` is the absorbed path once more, for one token per
row over a pool of cache rows, in the form torch.compile fuses (the compiled decode step);
tests/test_decode.py binds it to the absorbed `forward`. When `record_max_logits` is set, the
largest pre-softmax logit (softmax scale included, masked positions excluded) per head is kept in
`max_logits` for QK-Clip.

    B batch  S query positions  T key positions  D hidden  H heads  Q q latent rank
    C kv latent rank  P no-rope qk head dim  R rotary dim  O value head dim
    A = P + R (q/k head dim)  L = C + R (latent cache row)  Y = P + O (kv_b_proj rows per head)
    N = B·S (decode: one row per request)  X = S·H (query rows per sequence in the absorbed path)
    Z rows of a cache pool
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model import flash
from openk2.model.linear import decode_linear, pairs_kernel
from openk2.model.norm import RMSNorm
from openk2.model.rope import apply_rope


# pool dtype -> a kernel for `MLA.decode`'s attention past small batches, registered by openk2.kernels
# (`openk2::latent_attention`): (q [N, H, L], pool [Z, L], slots [N, T], pos [N], C, scale) -> [N, H, C] fp32
LATENT_KERNELS: dict = {}


@dataclass
class LatentCache:
    """One layer's cache: per token the normalised C-d latent and the roped R-d shared key, side by
    side in one row (ckv [B, T_max, C + R]: 576 values per token for K2), so one matmul scores both."""
    ckv: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, device=None) -> "LatentCache":
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return cls(torch.zeros(batch, max_len, width, dtype=dtype, device=device))


def causal_mask(S: int, T: int, start_pos: int, device) -> torch.Tensor:
    """[S, T] bool, True where query s (at position start_pos + s) may see key t."""
    q_pos = torch.arange(start_pos, start_pos + S, device=device)
    return torch.arange(T, device=device)[None, :] <= q_pos[:, None]


@dataclass(frozen=True)
class Packed:
    """Packed rows (SFT): causal sequences back to back, `runs` their lengths in order over the B·S
    positions (row by row; every row starts a run), none attending outside its own run."""
    runs: tuple[int, ...]
    shape: tuple[int, int]  # (B, S)

    def mask(self, device) -> torch.Tensor:
        """[B, S, S] bool, True where query s may see key t (block-diagonal causal)."""
        run_N = torch.repeat_interleave(torch.arange(len(self.runs), device=device),
                                        torch.tensor(self.runs, device=device)).view(self.shape)
        return (run_N[:, :, None] == run_N[:, None, :]) & causal_mask(self.shape[1], self.shape[1], 0, device)


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
        q_BSHA = q.view(B, S, self.cfg.num_attention_heads, self.cfg.qk_head_dim)
        return q_BSHA.split([self.cfg.qk_nope_head_dim, self.cfg.qk_rope_head_dim], dim=-1)

    def forward(self, x_BSD, cos, sin, cache: LatentCache | None = None, start_pos: int | torch.Tensor = 0,
                absorb: bool = False, packed: Packed | None = None):
        """start_pos: where this chunk starts, for all rows (int), or per row (LongTensor [B], with a
        cache: rows at different lengths decode together, each seeing only its own keys).
        packed: packed rows (no cache); the materialised path attends run by run, the absorbed one
        under the block-diagonal mask."""
        B, S, _ = x_BSD.shape
        C = self.cfg.kv_lora_rank
        q_nope_BSHP, q_pe_BSHR = self._query(x_BSD)
        q_pe_BSHR = apply_rope(q_pe_BSHR, cos, sin)
        kv_BSL = self.kv_a_proj_with_mqa(x_BSD)
        ckv_BSL = torch.cat([self.kv_a_layernorm(kv_BSL[..., :C]), apply_rope(kv_BSL[..., C:], cos, sin)], -1)
        ckv_BTL = ckv_BSL  # keys: this chunk, or everything cached up to it
        if packed is not None:
            mask_ST = packed if not absorb else packed.mask(x_BSD.device)
        elif isinstance(start_pos, torch.Tensor):  # per-row positions [B, S]; the mask is per row too
            pos_BS = start_pos[:, None] + torch.arange(S, device=x_BSD.device)
            cache.ckv[torch.arange(B, device=x_BSD.device)[:, None], pos_BS] = ckv_BSL
            ckv_BTL = cache.ckv[:B, :int(start_pos.max()) + S]
            mask_ST = torch.arange(ckv_BTL.shape[1], device=x_BSD.device) <= pos_BS[..., None]  # [B, S, T]
        else:  # mask: None when one query follows all its keys (decode); S == T: causal, built lazily
            if cache is not None:
                cache.ckv[:B, start_pos:start_pos + S] = ckv_BSL
                ckv_BTL = cache.ckv[:B, :start_pos + S]
            T = ckv_BTL.shape[1]
            mask_ST = causal_mask(S, T, start_pos, x_BSD.device) if 1 < S != T else None
        path = self._absorbed if absorb else self._materialised
        out_BSHO = path(q_nope_BSHP, q_pe_BSHR, ckv_BTL, mask_ST, causal=S > 1)
        return self.o_proj(out_BSHO.flatten(2))

    def _materialised(self, q_nope_BSHP, q_pe_BSHR, ckv_BTL, mask_ST, causal: bool):
        cfg = self.cfg
        B, T, _ = ckv_BTL.shape
        kv_BTC, pe_BTR = ckv_BTL.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        H, P = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kv_BTHY = self.kv_b_proj(kv_BTC).view(B, T, H, P + cfg.v_head_dim)
        k_nope_BTHP, v_BTHO = kv_BTHY.split([P, cfg.v_head_dim], dim=-1)
        k_BTHA = torch.cat([k_nope_BTHP, pe_BTR[:, :, None, :].expand(-1, -1, H, -1)], dim=-1)
        q_BHSA = torch.cat([q_nope_BSHP, q_pe_BSHR], dim=-1).transpose(1, 2)
        k_BHTA, v_BHTO = k_BTHA.transpose(1, 2), v_BTHO.transpose(1, 2)
        O, A = cfg.v_head_dim, cfg.qk_head_dim
        if isinstance(mask_ST, Packed) or (mask_ST is None and causal and flash.runs_kernel_serves(q_BHSA, B)):
            runs = mask_ST.runs if mask_ST is not None else (T,) * B  # training's causal rows: a run each
            out_BHSO, top_H = flash.by_runs(q_BHSA, k_BHTA, v_BHTO, runs, self.softmax_scale, self.record_max_logits)
            if top_H is not None:  # recorded
                self.max_logits = top_H
            return out_BHSO.transpose(1, 2)
        # the mask as [S, T] or [B, 1, S, T]: CPU's fused (flash) kernel takes no other (a 3-D one falls
        # back to the math path), and both broadcast over the heads of the recorded scores alike
        mask = mask_ST if mask_ST is None or mask_ST.dim() == 2 else mask_ST[:, None]
        if self.record_max_logits:  # logits once more, outside autograd: the fused kernel hides them
            with torch.no_grad():  # the max in the matmul's dtype, scaled after (in fp32): the same value
                scores_BHST = q_BHSA @ k_BHTA.transpose(-1, -2)
                self._record(scores_BHST, mask, causal, head_dim=1, scale=self.softmax_scale)
        # v padded to the qk head dim: CPU's fused (flash) kernel needs equal dims, ~10x the math path
        v_pad = F.pad(v_BHTO, (0, A - O)) if A > O else v_BHTO
        if mask is not None and mask.dim() == 2 and mask.shape[1] > mask.shape[0] > 1 and \
                q_BHSA.device.type == "cpu" and not torch.is_grad_enabled():  # a chunk after its prefix
            return flash.after_prefix(q_BHSA, k_BHTA, v_pad, self.softmax_scale)[..., :O].transpose(1, 2)
        out_BHSO = F.scaled_dot_product_attention(
            q_BHSA, k_BHTA, v_pad, attn_mask=mask,
            is_causal=causal and mask_ST is None,
            scale=self.softmax_scale)[..., :O]
        return out_BHSO.transpose(1, 2)

    def _absorbed(self, q_nope_BSHP, q_pe_BSHR, ckv_BTL, mask_ST, causal: bool):
        cfg = self.cfg
        B, S, H, P = q_nope_BSHP.shape
        C, O = cfg.kv_lora_rank, cfg.v_head_dim
        wkv_b_HYC = self.kv_b_proj.weight.view(H, P + O, C)
        w_uk_HPC, w_uv_HOC = wkv_b_HYC[:, :P], wkv_b_HYC[:, P:]
        # fold W_UK into the query: q_nope·(W_UK c) = (W_UKᵀ q_nope)·c   ("bshp,hpc->bshc")
        q_lat_HNC = torch.bmm(q_nope_BSHP.reshape(B * S, H, P).transpose(0, 1), w_uk_HPC)
        q_BXL = torch.cat([q_lat_HNC.transpose(0, 1).reshape(B, S * H, C),  # X = S·H query rows
                           q_pe_BSHR.reshape(B, S * H, -1)], dim=-1)
        # one matmul scores latent and rotary parts: [c ; k_pe] per cached token  ("bxc,btc->bxt")
        scores_BSHT = torch.bmm(q_BXL, ckv_BTL.transpose(1, 2)).view(B, S, H, -1).float() * self.softmax_scale
        if causal and mask_ST is None:
            mask_ST = causal_mask(S, S, 0, scores_BSHT.device)
        mask_S1T = mask_ST.unsqueeze(-2) if mask_ST is not None else None  # [(B,) S, 1, T]
        if self.record_max_logits:
            self._record(scores_BSHT.detach(), mask_S1T, False, head_dim=2)
        if mask_S1T is not None:
            probs_BSHT = scores_BSHT.masked_fill(~mask_S1T, float("-inf")).softmax(-1)
        else:
            probs_BSHT = scores_BSHT.softmax(-1)
        # values stay latent: o_lat = probs·c, then W_UV up-projects per head  ("bsht,btc->bshc")
        o_lat_BXC = torch.bmm(probs_BSHT.to(ckv_BTL.dtype).view(B, S * H, -1), ckv_BTL[..., :C])
        out_HNO = torch.bmm(o_lat_BXC.view(B * S, H, C).transpose(0, 1), w_uv_HOC.transpose(1, 2))
        return out_HNO.transpose(0, 1).reshape(B, S, H, O)

    def decode(self, x_ND, cos, sin, pool_ZL, slots_NT, pos_N, small: bool):
        """The absorbed path for one new token per row, written for torch.compile; its reference is
        `forward(absorb=True)` on the same rows gathered into a `LatentCache` (tests/test_decode.py).

        The cache is a flat pool of rows (an engine's block pool): row n's positions 0..T-1 are
        pool_ZL[slots_NT[n]], and its new row goes to position pos_N[n], written in place first. No
        data-dependent shapes: masking replaces slicing, and at small batches the gather fuses into the
        score loop (no per-step copy of the cache). `small`: projections as `matvec` (`decode_linear`).
        Shapes: x_ND [N, D], pool_ZL [Z, L], slots_NT [N, T], pos_N [N] -> [N, D].
        """
        cfg = self.cfg
        N = x_ND.shape[0]
        H, P, R, C, O = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.kv_lora_rank, cfg.v_head_dim)
        if cfg.q_lora_rank:
            q = decode_linear(self.q_b_proj, self.q_a_layernorm(decode_linear(self.q_a_proj, x_ND, small)), small)
        else:
            q = decode_linear(self.q_proj, x_ND, small)
        q_nope_NHP, q_pe_NHR = q.view(N, H, P + R).split([P, R], -1)
        q_pe_NHR = apply_rope(q_pe_NHR[:, None], cos, sin)[:, 0]
        kv_NL = decode_linear(self.kv_a_proj_with_mqa, x_ND, small)
        row_NL = torch.cat([self.kv_a_layernorm(kv_NL[:, :C]), apply_rope(kv_NL[:, None, C:], cos, sin)[:, 0]], -1)
        pool_ZL.index_put_((slots_NT.gather(1, pos_N[:, None])[:, 0],), row_NL)
        w_HYC = self.kv_b_proj.weight.view(H, P + O, C)
        # fold W_UK into the query, score latent and rotary parts at once (as `_absorbed`), mask, softmax.
        # Past small batches through openk2.kernels' kernels where registered (W_UK, W_UV per head as
        # stacks of H matrices; the attention over the pool, `LATENT_KERNELS`), else library matmuls: the
        # fused loops would recompute the scores in each of the softmax's passes (32 rows: ~3 of ~17 ms)
        kernel = None if small or pool_ZL.device.type != "cpu" else LATENT_KERNELS.get(pool_ZL.dtype)
        if small:
            q_lat_NHC = (q_nope_NHP[..., None] * w_HYC[:, :P]).sum(-2, dtype=torch.float32).to(x_ND.dtype)
        else:
            q_lat_NHC = self._per_head(q_nope_NHP, w_HYC[:, :P].transpose(1, 2), x_ND.dtype)
        q_NHL = torch.cat([q_lat_NHC, q_pe_NHR], -1)
        if kernel is not None:
            o_lat_NHC = kernel(q_NHL, pool_ZL, slots_NT, pos_N, C, self.softmax_scale).to(x_ND.dtype)
        else:
            ckv_NTL = pool_ZL[slots_NT]
            if small:
                scores_NHT = (q_NHL[:, :, None, :] * ckv_NTL[:, None]).sum(-1, dtype=torch.float32) * self.softmax_scale
            else:
                scores_NHT = torch.bmm(q_NHL, ckv_NTL.transpose(1, 2)).float() * self.softmax_scale
            visible_NT = torch.arange(slots_NT.shape[1], device=x_ND.device) <= pos_N[:, None]
            probs_NHT = scores_NHT.masked_fill(~visible_NT[:, None], float("-inf")).softmax(-1)
            # a library matmul (fp32: no rounding of the probabilities, and MKL's small-matrix kernel is the
            # fastest here), not multiply-and-reduce, which the compiler would fuse with the softmax and then
            # recompute each probability (an exp) once per latent channel
            o_lat_NHC = torch.bmm(probs_NHT, ckv_NTL[..., :C].float()).to(x_ND.dtype)
        if small:
            out_NHO = (o_lat_NHC[:, :, None, :] * w_HYC[:, P:]).sum(-1, dtype=torch.float32).to(x_ND.dtype)
        else:
            out_NHO = self._per_head(o_lat_NHC, w_HYC[:, P:], x_ND.dtype)
        return decode_linear(self.o_proj, out_NHO.flatten(1), small)

    @staticmethod
    def _per_head(x_NHI, w_HOI, dtype):
        """y[n, h] = w[h] x[n, h]: the stack kernel registered for w (each head read once), else a bmm."""
        (N, H, I), O = x_NHI.shape, w_HOI.shape[1]
        if (kernel := pairs_kernel(w_HOI)) is not None:
            heads_M = torch.arange(H, device=x_NHI.device).repeat(N)
            return kernel(x_NHI.reshape(N * H, I), w_HOI.contiguous(), None, heads_M).view(N, H, O).to(dtype)
        return torch.bmm(x_NHI.transpose(0, 1), w_HOI.transpose(1, 2)).transpose(0, 1).to(dtype)

    def _record(self, scores, mask, causal: bool, head_dim: int, scale: float = 1.0):
        """Keep the per-head max of the unmasked logits (scores · scale, fp32) in `max_logits`. The max
        is taken before the cast and the scaling: both are monotonic, so it is the same number, and at
        bf16 the full [B, H, S, T] scores are half the bytes (this was ~40% of attention's cost)."""
        self.max_logits = self._masked_max(scores, mask, causal, head_dim) * scale

    @staticmethod
    def _masked_max(scores, mask, causal: bool, head_dim: int) -> torch.Tensor:
        """Per-head max of the unmasked scores, fp32."""
        if mask is None and causal:
            S, T = scores.shape[-2:]
            mask = causal_mask(S, T, T - S, scores.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.amax(dim=[d for d in range(scores.dim()) if d != head_dim]).float()
