"""Linears as the decode step applies them (`Transformer.decode`), whatever holds their weights.

Every linear-like module shows the step one face, `decode_weights`:
- torch's `nn.Linear` has no such attribute: its weight is read as it is, (weight, None);
- a module that has one (the quantized modules of openk2.quant) gives (weight [O, I], per-row scale
  [O]): int8 codes are widened inside the loop and scaled after the sum; or (uint8 codes [O, I/2],
  group scale [O, G]): int4, two codes a byte, each group of I/G inputs stored as two halves (byte j
  holds input j in its low nibble, input j + I/2G in its high one), unpacked and scaled inside the
  loop; or None where the codes sit in an opaque layout: the step cannot read them, so such a model
  is not compiled (none of openk2's own modules does this).
Stacked experts give the same face four wide: (gate_up, its scale, down, its scale); the step reads
them per chosen expert (`pairs_matvec`), through the kernel openk2.kernels registered for the weights'
dtype where there is one (`PAIRS_KERNELS`; small batches' linears too, as stacks of one, and any
batch's where the kernel serves many rows, `PAIRS_ROWS`: bf16 and int8 on AMX).
The model never learns which format it holds; openk2.quant never learns how the step reads it.
`matvec` is the multiply-and-reduce that torch.compile fuses into one loop over the weight (eagerly
it would materialise [N, O, I]); its reference is the module's own forward (tests/test_decode.py).

    N rows  I in features  O out features
"""

import torch
from torch import nn


def decode_weights(mod: nn.Module):
    """The face of a linear-like module: (weight, scale or None), or None if unreadable (see above)."""
    return mod.decode_weights if hasattr(mod, "decode_weights") else (mod.weight, None)


def matvec(x_NI: torch.Tensor, w_OI: torch.Tensor, scale_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ wᵀ as a fused multiply-and-reduce, in fp32 (w may be int8 codes, widened inside the loop,
    with their row scale applied after the sum, or int4 codes with group scales, see above; w may
    also be [N, O, I], one matrix per row)."""
    if w_OI.dtype == torch.uint8:  # int4: w [..., O, I/2], scale [..., O, G]
        N, G = x_NI.shape[0], scale_O.shape[-1]
        x_N1G2H = x_NI.float().view(N, 1, G, 2, -1)
        w_OGH = w_OI.unflatten(-1, (G, -1))
        q_sum = x_N1G2H[..., 0, :] * ((w_OGH & 15).float() - 8) + x_N1G2H[..., 1, :] * ((w_OGH >> 4).float() - 8)
        return (q_sum * scale_O.float()[..., None]).sum((-2, -1))  # one fused loop (a 2-step sum: slower)
    y_NO = (x_NI[:, None, :] * w_OI).sum(-1, dtype=torch.float32)
    return y_NO if scale_O is None else y_NO * scale_O.float()


PAIRS_KERNELS: dict = {}  # codes dtype -> a format's CPU kernel for `pairs_matvec`, registered by openk2.kernels
# eagerly, a registered kernel serves matrices with up to this many rows each on average (decode steps,
# short prompts); above, one library matmul per matrix wins (crossover at ~24 rows for a 512×512 int4
# expert on 2 cores). A kernel that serves more for some shapes (bf16, and int8 with bf16 activations, on
# AMX) says so in PAIRS_ROWS: dtype -> f(O, I, activations' dtype) -> rows.
KERNEL_ROWS = 16
PAIRS_ROWS: dict = {}


def kernel_rows(w_OI: torch.Tensor, x_dtype: torch.dtype = torch.bfloat16) -> int:
    """Rows a matrix (of this stack) up to which its registered kernel beats a library matmul, for
    activations of x_dtype."""
    rows = PAIRS_ROWS.get(w_OI.dtype)
    return rows(w_OI.shape[-2], w_OI.shape[-1], x_dtype) if rows is not None else KERNEL_ROWS


def few_rows(rows: int, used: int, w_OI: torch.Tensor, x_dtype=torch.bfloat16) -> bool:
    """Whether `rows` rows over `used` matrices (of the stack w_OI) go through its kernel eagerly."""
    return rows <= kernel_rows(w_OI, x_dtype) * used


# codes dtype -> (kernel, f(O, I, G) -> rows): a kernel that multiplies bf16 rows by the codes dequantised
# to bf16, as a format's many-rows path does (int4: `unpack_halves`), up to that many rows a matrix
# (AMX; 0 where it cannot: shapes not in whole tiles, groups it does not read)
ROUNDED_KERNELS: dict = {}


def experts_kernel(x_MI: torch.Tensor, used: int, gate_up, gate_up_scale, down, down_scale):
    """The kernel eager experts (`used` of the stacks' matrices chosen) take for x's rows: none where
    autograd needs their inputs or no kernel is registered for their codes; the pairs kernel for few
    rows an expert (`few_rows`, both stacks); else a rounded kernel where one serves both stacks (int4
    codes on AMX: the weights their many-rows path multiplies by); else None (a matmul per expert)."""
    kernel = pairs_kernel(gate_up)
    if kernel is None or (torch.is_grad_enabled() and any(t.requires_grad for t in (x_MI, gate_up, down))):
        return None
    if all(few_rows(x_MI.shape[0], used, w, x_MI.dtype) for w in (gate_up, down)):
        return kernel
    rounded, rows = ROUNDED_KERNELS.get(gate_up.dtype, (None, None))
    if rounded is None or x_MI.dtype != torch.bfloat16:
        return None
    serves = [x_MI.shape[0] <= rows(w.shape[-2], 2 * w.shape[-1], s.shape[-1]) * used
              for w, s in ((gate_up, gate_up_scale), (down, down_scale))]
    return rounded if all(serves) else None


def pairs_kernel(w_EOI: torch.Tensor):
    """The registered kernel for these codes (CPU tensors only), or None."""
    return PAIRS_KERNELS.get(w_EOI.dtype) if w_EOI.device.type == "cpu" else None


def pairs_matvec(x_MI: torch.Tensor, w_EOI: torch.Tensor, scale_EO: torch.Tensor | None, idx_M: torch.Tensor):
    """Row m of x times matrix idx_M[m] of the stack w (the decode step's chosen experts), in fp32: a
    kernel registered for the codes' dtype, else `matvec` over the gathered matrices (inductor reads
    them in place inside its loop, no copy)."""
    kernel = pairs_kernel(w_EOI)
    if kernel is not None:
        return kernel(x_MI, w_EOI, scale_EO, idx_M)
    return matvec(x_MI, w_EOI[idx_M], None if scale_EO is None else scale_EO[idx_M])


def one_matrix(x_NI: torch.Tensor, w_OI: torch.Tensor, scale_O: torch.Tensor | None) -> torch.Tensor:
    """x @ wᵀ in fp32, as `pairs_matvec` over a stack of one matrix that every row chose."""
    one_N = torch.zeros(x_NI.shape[0], dtype=torch.long, device=x_NI.device)
    return pairs_matvec(x_NI, w_OI[None], None if scale_O is None else scale_O[None], one_N)


def decode_linear(mod: nn.Module, x_NI: torch.Tensor, small: bool) -> torch.Tensor:
    """mod(x_NI) in the decode step. Small batches: a stack of one matrix through the kernel registered
    for its weights (bf16, int8: read ~2x faster than by the fused loop), else `matvec` over its face;
    above, through a kernel that serves many rows (`kernel_rows`: bf16 and int8 on AMX; the choice
    reads no row count, so it adds no guard to the compiled graph), else a library matmul for a
    plain linear and the module's own kernel for any other."""
    face = decode_weights(mod)
    if not small and face is not None and pairs_kernel(face[0]) is not None and \
            kernel_rows(face[0], x_NI.dtype) > KERNEL_ROWS:
        return one_matrix(x_NI, *face).to(x_NI.dtype)
    if not small:  # weight-first (W @ xᵀ): oneDNN streams the weight faster this way round
        return torch.mm(mod.weight, x_NI.T).T if type(mod) is nn.Linear else mod(x_NI)
    w_OI, scale_O = face
    if pairs_kernel(w_OI) is not None:
        return one_matrix(x_NI, w_OI, scale_O).to(x_NI.dtype)
    return matvec(x_NI, w_OI, scale_O).to(x_NI.dtype)
