"""The routed experts' training loop, one matmul per used expert, with a hand-written backward.

Autograd through the per-expert loop is correct but slow on CPU: each expert's weights are a slice of
the stacks (unbind), whose backward stacks every expert's gradient into a new tensor, and under
autocast the stacks' bf16 copies back-propagate through a cast of each whole stack. Here the
backward computes the same products as autograd does (tests/test_model.py binds them) and writes each
expert's weight gradients straight into the stack's gradient. Rows that vary are padded for CPU's
bf16 kernels (`rows.pad_rows`), forward and backward alike.

The cast stacks and the weight gradients take kept memory (`kept.kept_empty`).
"""

import torch
import torch.nn.functional as F

from openk2.model.kept import kept_cast, kept_empty
from openk2.model.rows import pad_rows


def swiglu_rows(x_RD, w_gate_up, w_down, dtype: torch.dtype):
    """One expert's rows through its SwiGLU, padded for CPU's kernels when they run in `dtype`:
    (pre-activations [R, 2F], output [R, D]). The training loop's forward and the no-grad loop share it."""
    gu = F.linear(pad_rows(x_RD, dtype), w_gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return gu[:len(x_RD)], F.linear(F.silu(gate).mul_(up), w_down)[:len(x_RD)]


class ExpertLoop(torch.autograd.Function):
    """y_MD = SwiGLU_e(x) for each expert e's rows (counts[e] of them, sorted by expert), unweighted.

    Shapes: x_MD [M, D]; gate_up [E, 2F, D] (gate rows first); down [E, D, F]; counts: E ints.
    The products run in `dtype` (the stacks are cast once per call) and y comes back in it, as
    autocast's products do; dx comes back in x's dtype, the weight gradients in the weights'. Saved
    for backward: x, the cast stacks and the pre-activations [M, 2F]; the activations are recomputed.
    Differentiable once (no double backward: nothing in openk2 takes second derivatives).
    """

    @staticmethod
    def forward(ctx, x_MD, gate_up, down, counts: list[int], dtype: torch.dtype):
        x, w_gu, w_d = x_MD.to(dtype), kept_cast(gate_up, dtype), kept_cast(down, dtype)
        gu_M2F = x.new_empty(len(x), w_gu.shape[1])
        y_MD = x.new_empty(x.shape)
        start = 0
        for e, rows in enumerate(counts):
            if rows:
                span = slice(start, start + rows)
                gu_M2F[span], y_MD[span] = swiglu_rows(x[span], w_gu[e], w_d[e], dtype)
            start += rows
        ctx.save_for_backward(x, w_gu, w_d, gu_M2F)
        ctx.counts, ctx.dtypes = counts, (x_MD.dtype, gate_up.dtype, down.dtype)
        ctx.owners = (gate_up, down)  # whose kept memory the weight gradients take
        return y_MD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_MD):
        x, w_gu, w_d, gu_M2F = ctx.saved_tensors
        need_x, need_gu, need_d = ctx.needs_input_grad[:3]
        dtype = x.dtype
        dy = dy_MD.to(dtype)
        dx = torch.empty_like(x) if need_x else None
        dw_gu = kept_empty(ctx.owners[0], "grad", w_gu.shape, ctx.dtypes[1]) if need_gu else None
        dw_d = kept_empty(ctx.owners[1], "grad", w_d.shape, ctx.dtypes[2]) if need_d else None
        start = 0
        for e, rows in enumerate(ctx.counts):
            if not rows:  # an expert no row chose: no gradient
                for g in (dw_gu, dw_d):
                    if g is not None:
                        g[e].zero_()
                continue
            rows_ = slice(start, start + rows)
            dy_e, gu = pad_rows(dy[rows_], dtype), pad_rows(gu_M2F[rows_], dtype)
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate)
            if need_d:  # as autograd's: h = silu(gate) * up, rounded like the forward's
                dw_d[e].copy_(dy_e.mT @ act.mul(up))
            dh = dy_e @ w_d[e]
            dgu = torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * act], dim=-1)
            if need_gu:
                dw_gu[e].copy_(dgu.mT @ pad_rows(x[rows_], dtype))
            if need_x:
                dx[rows_] = (dgu @ w_gu[e])[:rows]
            start += rows
        return (dx.to(ctx.dtypes[0]) if need_x else None), dw_gu, dw_d, None, None
