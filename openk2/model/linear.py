"""Linears as the decode step applies them (`Transformer.decode`), whatever holds their weights.

Every linear-like module shows the step one face, `decode_weights`:
- torch's `nn.Linear` has no such attribute: its weight is read as it is, (weight, None);
- a module that has one (the quantized modules of openk2.quant) gives (weight [O, I], per-row scale
  [O]): int8 codes are widened inside the loop and scaled after the sum; or None where the codes sit
  in a kernel's opaque layout (int4): the step cannot read them, so such a model is not compiled.
Stacked experts give the same face four wide: (gate_up, its scale, down, its scale).
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
    with their row scale applied after the sum; w may also be [N, O, I], one matrix per row)."""
    y_NO = (x_NI[:, None, :] * w_OI).sum(-1, dtype=torch.float32)
    return y_NO if scale_O is None else y_NO * scale_O.float()


def decode_linear(mod: nn.Module, x_NI: torch.Tensor, small: bool) -> torch.Tensor:
    """mod(x_NI) in the decode step: `matvec` over its face for small batches; above, a library
    matmul for a plain linear and the module's own kernel for any other."""
    if not small:  # weight-first (W @ xᵀ): oneDNN streams the weight faster this way round
        return torch.mm(mod.weight, x_NI.T).T if type(mod) is nn.Linear else mod(x_NI)
    w_OI, scale_O = decode_weights(mod)
    return matvec(x_NI, w_OI, scale_O).to(x_NI.dtype)
