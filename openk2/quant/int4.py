"""Weight-only int4 as K2-Thinking ships it (K2-SPEC §4.3): symmetric, one scale per 32 inputs of a row,
W[o, i] ≈ q · scale[o, i // 32], q ∈ [-8, 7] (stored as q + 8, eight codes per int32).

Two layouts of the same codes:
- the checkpoint layout (`weight_packed` int32 [O, I/8], `weight_scale` [O, I/32], the tensors of a
  K2-Thinking shard): `quantize_int4` / `dequantize_int4`, the one definition of the format (checkpoint
  load and save use it too), read by the reference `int4_linear_reference` (dequantise to the
  activation dtype, then F.linear);
- the decode layout of stacked experts (int4_decode.py: `Int4Experts`, read by the compiled decode step);
- ATen's CPU kernel layout (`_convert_weight_to_int4pack_for_cpu`: uint8 [O, I/2], blocked by rows,
  an implementation detail, so never saved) with `scales_and_zeros` [I/32, O, 2], read by the fast
  path `int4_linear` (`_weight_int4pack_mm_for_cpu`, which computes W = (code − 8) · scale + zero:
  zero = 0 makes it symmetric). It needs O % 16 == 0 and I % 32 == 0.
tests/test_quant.py binds the layouts on the same codes, and a whole quantized model to its reference,
`openk2.quant.fake_quantize`. `Int4Linear` holds one layout: the kernel's where it applies, else the
checkpoint's. The kernel's cost grows linearly with the rows (one thread, 512×512 bf16: 25 µs for 1
row, 396 µs for 64; dequantise + matmul ~850 µs for any of these), so prefill of many rows through
one matrix is where it is weakest; with fp32 activations it is ~20x slower per row (fine for tests).

    N rows (tokens)  I in features  O out features  G groups per row (I / 32)
"""

import torch
import torch.nn.functional as F
from torch import nn

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


def cpu_kernel_fits(out_features: int, in_features: int, group: int = INT4_GROUP) -> bool:
    return out_features % 16 == 0 and in_features % group == 0 and group in (32, 64, 128, 256)


def pack_for_cpu(packed_OP: torch.Tensor, scale_OG: torch.Tensor):
    """Checkpoint layout -> (ATen CPU kernel weight uint8 [O, I/2], scales_and_zeros [G, O, 2])."""
    kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed_OP).contiguous(), 1)
    scales_and_zeros = torch.stack([scale_OG.t(), torch.zeros_like(scale_OG.t())], dim=-1).contiguous()
    return kernel_weight, scales_and_zeros


def int4_linear(x_NI, kernel_weight, scales_and_zeros, group: int = INT4_GROUP):
    """x @ Wᵀ straight from the kernel layout (CPU; fp32 accumulation, fp32/bf16/fp16 activations)."""
    x_2d = x_NI.reshape(-1, x_NI.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x_2d, kernel_weight, group,
                                                   scales_and_zeros.to(x_NI.dtype))
    return y.view(*x_NI.shape[:-1], scales_and_zeros.shape[1])


class Int4Linear(nn.Module):
    """nn.Linear(I, O, bias=False) as group-wise symmetric int4, holding one layout of its codes.

    On CPU, where the kernel fits, only the kernel's layout (`kernel_weight`, `scales_and_zeros`:
    0.5 bytes per weight; not persistent, as it is no file format); elsewhere K2-Thinking's
    (`weight_packed`, `weight_scale`), dequantised per call. Quantize after moving the model to its
    device. Inference only: buffers, not parameters, fixed at construction.
    """

    def __init__(self, weight_packed: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight_packed.shape[0], weight_packed.shape[1] * 8
        self.group = self.in_features // weight_scale.shape[1]
        kernel = (weight_packed.device.type == "cpu"
                  and cpu_kernel_fits(self.out_features, self.in_features, self.group))
        kernel_weight, scales_and_zeros = pack_for_cpu(weight_packed, weight_scale) if kernel else (None, None)
        self.register_buffer("kernel_weight", kernel_weight, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.register_buffer("weight_packed", None if kernel else weight_packed)
        self.register_buffer("weight_scale", None if kernel else weight_scale)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w_OI: torch.Tensor, group: int = INT4_GROUP) -> "Int4Linear":
        return cls(*quantize_int4(w_OI, group))

    @property
    def decode_weights(self):
        """None: the compiled decode step cannot read packed codes (openk2.model.linear); int4 models
        decode eagerly, through this module's forward."""
        return None

    def forward(self, x):
        if self.kernel_weight is not None:
            return int4_linear(x, self.kernel_weight, self.scales_and_zeros, self.group)
        return int4_linear_reference(x, self.weight_packed, self.weight_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group}, "
                f"{'CPU kernel' if self.kernel_weight is not None else 'dequantised per call'}")

