"""The routed experts' training products, with a hand-written backward.

Autograd through a per-expert loop is correct but slow on CPU: each expert's weights are a slice of
the stacks (unbind), whose backward stacks every expert's gradient into a new tensor, and under
autocast the stacks' bf16 copies back-propagate through a cast of each whole stack. Here the
backward computes the same products as autograd does (tests/test_model.py binds them) and writes the
weight gradients straight into the stacks' gradients.

Two layouts, the same products:
- batched, where the experts' shares are even enough (`batch_rows`): all experts' rows laid out
  [E, R, D], zero rows after each expert's own, one batched matmul per product (a training step's
  tokens spread evenly over the experts; k2-mini SFT at 4 × 2,048: 32 experts of ~1,024 rows);
- a loop, one matmul per used expert, its rows padded for CPU's bf16 kernels (`rows.pad_rows`).
The routing weight scales each row's F-wide hidden, inside the products (half of D wide in the
presets, under a third in K2), so no [M, D] product, copy or reduction is spent on it forward or
backward. (Inference's expert paths scale the output: the same up to rounding.)

The cast stacks and the weight gradients take kept memory (`kept.kept_empty`).
"""

import torch
import torch.nn.functional as F

from openk2.model.kept import kept_cast, kept_empty
from openk2.model.rows import pad_rows


def swiglu_rows(x_RD, w_gate_up, w_down, dtype: torch.dtype, s_R1=None):
    """One expert's rows through its SwiGLU, padded for CPU's kernels when they run in `dtype`, each
    row's hidden scaled by its routing weight s_R1 [R, 1] if given: (pre-activations [R, 2F], output [R, D])."""
    gu, y = _swiglu(pad_rows(x_RD, dtype), w_gate_up, w_down, None if s_R1 is None else pad_rows(s_R1, dtype))
    return gu[:len(x_RD)], y[:len(x_RD)]


def _swiglu(x, w_gu, w_d, s):
    """x [.., R, D] through w_gu [.., 2F, D] and w_d [.., D, F] (one expert, or a batch of them), the
    hidden scaled by s [.., R, 1] (None: not scaled): (pre-activations [.., R, 2F], output [.., R, D])."""
    gu = torch.matmul(x, w_gu.mT)
    gate, up = gu.chunk(2, dim=-1)
    h = F.silu(gate).mul_(up)
    return gu, torch.matmul(h if s is None else h.mul_(s), w_d.mT)


def _swiglu_backward(dy, x, gu, s, w_gu, w_d, need_gu: bool, need_d: bool):
    """`_swiglu`'s gradients (dx, dw_gu, dw_d, ds), as autograd's (the activations recomputed and
    rounded as the forward's)."""
    gate, up = gu.chunk(2, dim=-1)
    act = F.silu(gate)
    h = act * up
    dw_d = dy.mT @ h.mul(s) if need_d else None
    dhs = dy @ w_d  # d(h · s)
    ds = (dhs * h).sum(-1, keepdim=True)
    dh = dhs * s
    dgu = torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * act], dim=-1)
    return dgu @ w_gu, (dgu.mT @ x if need_gu else None), dw_d, ds


def batch_rows(counts: list[int]) -> int | None:
    """Rows per expert of the batched layout: the most any expert has, rounded up to 64 (few distinct
    shapes for oneDNN's kernel cache), where that pads the rows by at most half again; else None."""
    rows = -(-max(counts, default=0) // 64) * 64
    return rows if 0 < len(counts) * rows <= 1.5 * sum(counts) else None


def _positions(counts: list[int], rows: int, device) -> torch.Tensor:
    """[M]: where each row (sorted by expert) sits in the [E · rows] batched layout."""
    counts_E = torch.tensor(counts, device=device)
    e_M = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_E, output_size=sum(counts))
    return e_M * rows + torch.arange(len(e_M), device=device) - (counts_E.cumsum(0) - counts_E)[e_M]


def _spread(x_MD: torch.Tensor, pos_M: torch.Tensor, E: int, rows: int) -> torch.Tensor:
    """x's rows in the batched layout [E, rows, D], zeros between."""
    return x_MD.new_zeros(E * rows, x_MD.shape[-1]).index_copy_(0, pos_M, x_MD).view(E, rows, -1)


class ExpertLoop(torch.autograd.Function):
    """y_MD = w_M · SwiGLU_e(x) for each expert e's rows (counts[e] of them, sorted by expert), the
    weight applied to the hidden: (silu(gate) · up · w) @ down.

    Shapes: x_MD [M, D]; w_M [M]; gate_up [E, 2F, D] (gate rows first); down [E, D, F]; counts: E ints.
    The products run in `dtype` (the stacks and the weights are cast once per call) and y comes back
    in it, as autocast's products do; dx and dw come back in x's and w's dtypes, the weight gradients
    in the stacks'. Saved for backward: x, w, the cast stacks and the pre-activations [M, 2F] (the
    activations are recomputed); in the batched layout x, w and the pre-activations padded ([E · R, …],
    at most 1.5 M rows) and the rows' positions. Differentiable once (nothing in openk2 takes second derivatives).
    """

    @staticmethod
    def forward(ctx, x_MD, w_M, gate_up, down, counts: list[int], dtype: torch.dtype):
        x, s, w_gu, w_d = x_MD.to(dtype), w_M.to(dtype)[:, None], kept_cast(gate_up, dtype), kept_cast(down, dtype)
        rows = batch_rows(counts)
        if rows is not None:  # x [E, R, D], s [E, R, 1], the pre-activations [E, R, 2F]
            pos_M = _positions(counts, rows, x.device)
            x, s = _spread(x, pos_M, len(counts), rows), _spread(s, pos_M, len(counts), rows)
            gu_M2F, y = _swiglu(x, w_gu, w_d, s)
            y_MD = y.view(-1, x.shape[-1]).index_select(0, pos_M)
            ctx.save_for_backward(x, s, w_gu, w_d, gu_M2F, pos_M)
        else:
            gu_M2F = x.new_empty(len(x), w_gu.shape[1])
            y_MD = x.new_empty(x.shape)
            start = 0
            for e, n in enumerate(counts):
                if n:
                    span = slice(start, start + n)
                    gu_M2F[span], y_MD[span] = swiglu_rows(x[span], w_gu[e], w_d[e], dtype, s[span])
                start += n
            ctx.save_for_backward(x, s, w_gu, w_d, gu_M2F)
        ctx.counts, ctx.dtypes = counts, (x_MD.dtype, w_M.dtype, gate_up.dtype, down.dtype)
        ctx.owners = (gate_up, down)  # whose kept memory the weight gradients take
        return y_MD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_MD):
        x, s, w_gu, w_d, gu_M2F, *pos = ctx.saved_tensors
        need_x, need_w, need_gu, need_d = ctx.needs_input_grad[:4]
        dtype = x.dtype
        dy = dy_MD.to(dtype)
        dw_gu = kept_empty(ctx.owners[0], "grad", w_gu.shape, ctx.dtypes[2]) if need_gu else None
        dw_d = kept_empty(ctx.owners[1], "grad", w_d.shape, ctx.dtypes[3]) if need_d else None
        if pos:  # the batched layout (zero rows add nothing to the weight gradients)
            (pos_M,), (E, rows, _) = pos, x.shape
            dx, gu_grad, d_grad, ds = _swiglu_backward(_spread(dy, pos_M, E, rows), x, gu_M2F, s, w_gu, w_d,
                                                       need_gu, need_d)
            for grad, g in ((dw_gu, gu_grad), (dw_d, d_grad)):
                if grad is not None:
                    grad.copy_(g)
            dx, ds = (t.view(E * rows, -1).index_select(0, pos_M) for t in (dx, ds))
        else:
            dx, ds = torch.empty_like(x), torch.empty_like(s)
            start = 0
            for e, n in enumerate(ctx.counts):
                if not n:  # an expert no row chose: no gradient
                    for grad in (dw_gu, dw_d):
                        if grad is not None:
                            grad[e].zero_()
                    continue
                span = slice(start, start + n)
                dx_e, gu_grad, d_grad, ds_e = _swiglu_backward(
                    *(pad_rows(t[span], dtype) for t in (dy, x, gu_M2F, s)), w_gu[e], w_d[e], need_gu, need_d)
                for grad, g in ((dw_gu, gu_grad), (dw_d, d_grad)):
                    if grad is not None:
                        grad[e].copy_(g)
                dx[span], ds[span] = dx_e[:n], ds_e[:n]
                start += n
        return (dx.to(ctx.dtypes[0]) if need_x else None, ds[:, 0].to(ctx.dtypes[1]) if need_w else None,
                dw_gu, dw_d, None, None)
