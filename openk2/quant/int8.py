"""Weight-only int8, one scale per output channel: W ≈ q · scale[:, None], q ∈ [-127, 127].

`quantize_int8` / `dequantize_int8` are the format; `int8_linear` is the fast path (ATen's CPU
`_weight_int8pack_mm`: int8 weight, fp32 accumulation) and `int8_linear_reference` its specification
(dequantise to the activation dtype, then F.linear); tests/test_quant.py binds the two, and a whole
quantized model to its reference, `openk2.quant.fake_quantize`.
`Int8Linear` is the drop-in for an `nn.Linear` (no bias: K2 has none); it takes the kernel where the
kernel wins (`use_kernel`). K2 ships no int8 checkpoint, so int8 is applied at load time
(`openk2.quant.quantize_model`).

    N rows (tokens)  I in features  O out features
"""

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric: -128 is never produced, so |q| ≤ 127 and -q is representable
# The kernel's cost grows linearly with the rows (one thread, AVX512, 512×512 bf16: 27 µs for 1 row,
# 428 µs for 64), while dequantise + matmul costs ~230 µs for 1 to 64 rows: the kernel wins up to
# ~32 rows (~100 at 1024×2048). With fp32 activations it is ~20x slower per row and never wins.
KERNEL_MAX_ROWS = 32
KERNEL_IN_MULTIPLE = 16  # in-features the kernel handles (see `use_kernel`)


def quantize_int8(w_OI: torch.Tensor, scale_dtype: torch.dtype | None = None):
    """(q int8 [O, I], scale [O]) with scale = amax(|row|) / 127, q = round(w / scale).

    Notes: the scale is rounded to `scale_dtype` (default the weight's) *before* q is computed, so
    |w − q·scale| ≤ scale / 2 holds for the stored scale.
    """
    scale_O = (w_OI.float().abs().amax(dim=1) / QMAX).clamp(min=1e-12).to(scale_dtype or w_OI.dtype)
    q_OI = torch.round(w_OI.float() / scale_O.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q_OI, scale_O


def dequantize_int8(q_OI: torch.Tensor, scale_O: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """W = q · scale[:, None] in `dtype` (q is exact in any float dtype; the scale is cast first, as
    the kernel does)."""
    return q_OI.to(dtype) * scale_O.to(dtype)[:, None]


def int8_linear_reference(x_NI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """The specification: dequantise to the activation dtype, then an ordinary matmul."""
    return F.linear(x_NI, dequantize_int8(q_OI, scale_O, x_NI.dtype))


def int8_linear(x_NI: torch.Tensor, q_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x @ (q · scale)ᵀ without materialising the weight; CPU, fp32/bf16/fp16 activations.

    Notes: the kernel multiplies by the scale after the int8·x dot product (fp32 accumulation), so it
    differs from the reference by rounding only (~1e-7 relative in fp32, a few ulps in bf16).
    """
    x_2d = x_NI.reshape(-1, x_NI.shape[-1]).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x_2d, q_OI, scale_O.to(x_NI.dtype))
    return y.view(*x_NI.shape[:-1], q_OI.shape[0])


def use_kernel(x: torch.Tensor) -> bool:
    """Whether the CPU kernel beats dequantise-then-matmul for activations x (see KERNEL_MAX_ROWS), and
    can take them: torch 2.13's kernel is right only for in-features that are a multiple of 16 (others
    give wrong sums, or crash the process; tests/test_quant.py)."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[-1] % KERNEL_IN_MULTIPLE == 0 and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1])


class Int8Linear(nn.Module):
    """nn.Linear(I, O, bias=False) with an int8 weight [O, I] and a per-row scale [O].

    Buffers, not parameters: a quantized model is for inference. Named as compressed-tensors'
    channel-wise int8 (`weight`, `weight_scale`), though K2 ships no such checkpoint.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w_OI: torch.Tensor) -> "Int8Linear":
        return cls(*quantize_int8(w_OI))

    @property
    def decode_weights(self):
        """The face the compiled decode step reads (openk2.model.linear): codes and row scales."""
        return self.weight, self.weight_scale

    def forward(self, x):
        if use_kernel(x):
            return int8_linear(x, self.weight, self.weight_scale)
        return int8_linear_reference(x, self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"
