"""Weight-only int4 as K2-Thinking ships it (K2-SPEC §4.3): symmetric, one scale per 32 inputs of a row,
W[o, i] ≈ q · scale[o, i // 32], q ∈ [-8, 7] (stored as q + 8, eight codes per int32).

Two layouts of the same codes:
- the checkpoint layout (`weight_packed` int32 [O, I/8], `weight_scale` [O, I/32], the tensors of a
  K2-Thinking shard): `quantize_int4` / `dequantize_int4`, the one definition of the format (checkpoint
  load and save use it too), read by the reference `int4_linear_reference` (dequantise to the
  activation dtype, then F.linear);
- the decode layout (int4_decode.py: `Int4Experts` and `Int4Linear`, which the compiled decode step
  and openk2's int4 kernel read).
tests/test_quant.py binds the layouts on the same codes, and a whole quantized model to its reference,
`openk2.quant.fake_quantize`.

    N rows (tokens)  I in features  O out features  G groups per row (I / 32)
"""

import torch
import torch.nn.functional as F

from openk2.info import INT4_GROUP  # K2-Thinking's group size (a checkpoint's own comes from its quantization_config)

_SHIFTS = tuple(range(0, 32, 4))  # code k of a word sits at bits 4k..4k+3: lowest nibble first


def quantize_int4(w_OI: torch.Tensor, group: int = INT4_GROUP, scale_dtype: torch.dtype | None = None):
    """(packed int32 [O, I/8], scale [O, I/group]): scale = amax(|group|) / 7, code = round(w / scale) + 8.

    Notes: as K2-Thinking, amax maps to ±7, so -8 is never produced; the scale is rounded to
    `scale_dtype` (default the weight's) first, so |w − q·scale| ≤ scale / 2 for the stored scale.
    Re-quantising a dequantised K2-Thinking weight gives back its exact codes and scales.
    """
    if w_OI.shape[1] % group:
        raise ValueError(f"int4: in features ({w_OI.shape[1]}) must be a multiple of the group ({group})")
    g_OGS = w_OI.float().unflatten(1, (-1, group))
    scale_OG = (g_OGS.abs().amax(-1) / 7).clamp(min=1e-12).to(scale_dtype or w_OI.dtype)
    codes_OI = (torch.round(g_OGS / scale_OG.float()[..., None]).clamp(-8, 7) + 8).to(torch.int32).flatten(1)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=w_OI.device)
    # the eight 4-bit fields are disjoint, so their sum is their bitwise or (the top one wraps the sign)
    return (codes_OI.unflatten(1, (-1, 8)) << shifts).sum(-1, dtype=torch.int32), scale_OG


def unpack_int4(packed_OP: torch.Tensor) -> torch.Tensor:
    """The unsigned codes 0..15 of packed words, int32 [O, 8P]."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed_OP.device)
    return ((packed_OP[..., None] >> shifts) & 0xF).flatten(1)


def dequantize_int4(packed_OP: torch.Tensor, scale_OG: torch.Tensor, dtype=torch.float32,
                    shape=None, group: int | None = None) -> torch.Tensor:
    """W = (code − 8) · scale[o, i // group], computed in fp32 and rounded once to `dtype`; [O, I].

    shape (O, I) defaults to the packed width and group to the one it implies; a checkpoint passes
    its `weight_shape` and its config's group size, checked here against the tensors.
    """
    rows, cols = (int(n) for n in shape) if shape is not None else (packed_OP.shape[0], packed_OP.shape[1] * 8)
    group = group or cols // scale_OG.shape[1]
    if tuple(packed_OP.shape) != (rows, -(-cols // 8)) or tuple(scale_OG.shape) != (rows, -(-cols // group)):
        raise ValueError(f"INT4 tensors packed {tuple(packed_OP.shape)} / scale {tuple(scale_OG.shape)} do not "
                         f"fit a {rows}x{cols} weight with groups of {group}")
    q_OI = unpack_int4(packed_OP)[:, :cols].float() - 8
    return (q_OI * scale_OG.float().repeat_interleave(group, 1)[:, :cols]).to(dtype)


def int4_linear_reference(x_NI, packed_OP, scale_OG):
    """The specification: dequantise to the activation dtype, then an ordinary matmul."""
    return F.linear(x_NI, dequantize_int4(packed_OP, scale_OG, x_NI.dtype))
