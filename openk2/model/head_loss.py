"""The vocabulary projection and its cross entropy together, row chunk by row chunk (training).

Unfused, a training step holds the logits [N, V] several times over: the product, its fp32 copy, the
log-softmax and the gradients of each (k2-small, 2,048 positions × 8,192: 33–67 MB apiece, on fresh
pages every step on CPU). Here CHUNK rows at a time go through the product, the log-sum-exp and the
gradient of the logits (softmax minus the target's one-hot), each chunk's made and dropped in turn.
The gradients of the rows and of the weight are computed in forward: a loss is where backward starts,
so its incoming gradient is one scalar, which backward multiplies in.

The numbers are those of `lm_loss(F.linear(h, w), targets)` under autocast: products in the autocast
dtype, logits rounded to it, softmax in fp32, the logits' gradient rounded to it for the products.
The weight's gradient sums the chunks' products in the weight's dtype (one product rounds once; this
rounds per chunk, then adds: tests/test_head_loss.py bounds the difference). Differentiable once.
"""

import torch

from openk2.model.kept import kept_cast, kept_empty
from openk2.model.rows import matmul_dtype, pad_rows

CHUNK = 256  # rows: k2-small's 256 × 8,192 fp32 logits are 8 MB


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of h_ND @ w_VDᵀ against targets_N (every row has one), products in `dtype`;
    the gradients only where `grads` (the caller's grad mode: forward itself runs without it)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, dtype: torch.dtype, grads: bool):
        need_h, need_w = (grads and need for need in ctx.needs_input_grad[:2])
        N = len(h_ND)
        h, w = h_ND.to(dtype), kept_cast(w_VD, dtype)
        dh_ND = torch.empty_like(h_ND) if need_h else None
        dw_VD = kept_empty(w_VD, "grad", w_VD.shape, w_VD.dtype).zero_() if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=h_ND.device)
        for start in range(0, N, CHUNK):
            rows = min(CHUNK, N - start)
            h_c = pad_rows(h[start:start + rows], dtype)  # the last chunk's count varies: padded
            t_c = targets_N[start:start + rows, None]
            logits = (h_c @ w.mT).float()
            lse = logits.logsumexp(-1, keepdim=True)
            total += (lse[:rows] - logits[:rows].gather(1, t_c)).sum()
            if need_h or need_w:
                p = logits.sub_(lse).exp_()  # softmax, in place of the logits
                p[rows:] = 0
                p[:rows].scatter_add_(1, t_c, p.new_full(t_c.shape, -1.0))
                g = p.mul_(1.0 / N).to(dtype)
                if need_h:
                    dh_ND[start:start + rows] = (g @ w)[:rows]
                if need_w:
                    dw_VD += g.mT @ h_c
        ctx.save_for_backward(dh_ND, dw_VD)
        return (total / N).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss):
        dh_ND, dw_VD = ctx.saved_tensors
        if not bool(d_loss == 1):  # 1 unless the loss was scaled (accumulation)
            dh_ND, dw_VD = (None if g is None else g * d_loss.to(g.dtype) for g in (dh_ND, dw_VD))
        return dh_ND, dw_VD, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) of the logits h_ND @ w_VDᵀ, which are never held whole;
    rows whose target is `ignore_index` are left out (none left: nan, as `F.cross_entropy`)."""
    keep = targets_N != ignore_index
    if not bool(keep.all()):
        h_ND, targets_N = h_ND[keep], targets_N[keep]
    return LinearCrossEntropy.apply(h_ND, w_VD, targets_N, matmul_dtype(h_ND), torch.is_grad_enabled())
