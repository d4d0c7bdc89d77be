"""YaRN rotary tables and the interleaved-pair rotary of K2's checkpoints (K2-SPEC §3.4-3.5).

Pure functions. Pair i of the rotary channels is (2i, 2i+1), rotated as the complex number
x[2i] + j·x[2i+1] times exp(j·pos·θ_i); the checkpoint's q_pe / k_pe rows are laid out that way,
so no permutation is needed at load time.
"""

import math

import torch

from openk2.config import ModelConfig


def _correction_dim(rotations: float, dim: int, base: float, original_max: int) -> float:
    return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies [R/2] (after YaRN when configured) and the cos/sin multiplier."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if cfg.rope_type != "yarn":
        return inv_freq, 1.0
    rs = cfg.rope_scaling
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    low = max(math.floor(_correction_dim(beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    # cos/sin multiplier; as transformers: the mscale ratio when both are set, else mscale(factor)
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    mult = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    return inv_freq, mult


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, mult: float = 1.0, dtype=torch.float32):
    """cos, sin of shape [*positions.shape, R/2], computed in fp32, returned in `dtype`."""
    angles = positions.float()[..., None] * inv_freq
    return (angles.cos() * mult).to(dtype), (angles.sin() * mult).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x [B, S, R] or [B, S, H, R]; cos/sin [S, R/2] or per row [B, S, R/2]."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if x.dim() == 4:  # per-head input: broadcast over H
        cos, sin = cos[:, :, None], sin[:, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
