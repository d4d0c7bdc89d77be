"""Block FP8, the weight format of K2-Instruct's release (K2-SPEC §4.2): float8_e4m3fn codes and one
fp32 `weight_scale_inv` per 128×128 tile, W[i, j] = float(code[i, j]) · scale_inv[i // 128, j // 128]
(edge tiles partial).

Only the format lives here: `openk2.checkpoint` dequantises FP8 weights as a folder loads and writes
them back with `save_hf(fmt="fp8")`; there is no FP8 compute (no CPU kernel to run the codes as they
are). tests/test_checkpoint.py checks both directions against the formula and the error bound.
"""

import torch

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest float8_e4m3fn value
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def _tile_scale(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """One scale per block×block tile, expanded to [rows, cols] (edge tiles partial)."""
    return scale.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def dequantize_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """W[i, j] = float(W_fp8[i, j]) · scale_inv[i // block, j // block]; fp32."""
    rows, cols = w_fp8.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"FP8 scale of shape {tuple(scale_inv.shape)} for a {rows}x{cols} weight with "
                         f"{block}x{block} blocks (expected {want})")
    return w_fp8.float() * _tile_scale(scale_inv, rows, cols, block)


def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_fp8, scale_inv) as K2 ships them: scale_inv = amax(|tile|) / 448, W_fp8 = W / scale_inv."""
    rows, cols = w.shape
    tiles = w.float().new_zeros(-(-rows // block) * block, -(-cols // block) * block)
    tiles[:rows, :cols] = w.float()
    tiles = tiles.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [rt, block, ct, block]
    scale_inv = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / _tile_scale(scale_inv, rows, cols, block)).to(torch.float8_e4m3fn), scale_inv
