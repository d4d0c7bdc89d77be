"""The vocabulary projection and its cross entropy together, row chunk by row chunk (training).

Unfused, a training step holds the logits [N, V] several times over: the product, its fp32 copy, the
log-softmax and the gradients of each (k2-small, 2,048 positions × 8,192: 33–67 MB apiece, on fresh
pages every step on CPU). Here CHUNK rows at a time go through the product, the log-sum-exp and the
gradient of the logits (softmax minus the target's one-hot), each chunk's made and dropped in turn;
the logits' gradient (products' dtype) is multiplied in blocks of BLOCK_BYTES (k2-small: all 2,048 rows).
The gradients of the rows and of the weight are computed in forward: a loss is where backward starts,
so its incoming gradient is one scalar, which backward multiplies in.

The numbers are those of `lm_loss(F.linear(h, w), targets)` under autocast: products in the autocast
dtype, logits rounded to it, softmax in fp32, the logits' gradient rounded to it for the products.
The weight's gradient sums the blocks' products in the weight's dtype (one block: one product, as
unfused; tests/test_head_loss.py bounds the difference). Differentiable once.

A target t <= AVOID asks the opposite of its token a = AVOID - t (unlikelihood, Welleck et al. 2019):
that row's loss is -log(1 - p_a), its logits' gradient (p_a / (1 - p_a))·(onehot_a - p) (`_chunk_loss`
takes both in a form that stays exact as p_a nears 1); such rows count in the mean like the others.
SFT marks the names of refused tool calls so (`tokenizer/sft.py`).
"""

import torch

from openk2.model.kept import kept_cast, kept_empty
from openk2.model.rows import matmul_dtype, pad_rows

AVOID = -1000  # a target at or below: the token AVOID - t is to be avoided (see the module docstring)
CHUNK = 256  # rows: k2-small's 256 × 8,192 fp32 logits are 8 MB
BLOCK_BYTES = 32 << 20  # the logits' gradient (products' dtype) is multiplied by a block of this many bytes


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of h_ND @ w_VDᵀ against targets_N (every row has one), products in `dtype`;
    the gradients only where `grads` (the caller's grad mode: forward itself runs without it)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, dtype: torch.dtype, grads: bool):
        need_h, need_w = (grads and need for need in ctx.needs_input_grad[:2])
        (N, _), V = h_ND.shape, w_VD.shape[0]
        h, w = h_ND.to(dtype), kept_cast(w_VD, dtype)
        dh_ND = torch.empty_like(h_ND) if need_h else None
        dw_VD = kept_empty(w_VD, "grad", w_VD.shape, w_VD.dtype) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=h_ND.device)
        block = max(CHUNK, BLOCK_BYTES // (V * dtype.itemsize) // CHUNK * CHUNK)  # rows, whole chunks
        avoiding = bool((targets_N <= AVOID).any())
        for b0 in range(0, N, block):  # a block: its chunks' logits, then its two products
            n_b = min(block, N - b0)
            h_b = pad_rows(h[b0:b0 + n_b], dtype)  # the last block's count varies: padded (zero rows)
            g_b = kept_empty(w_VD, "dlogits", (len(h_b), V), dtype) if need_h or need_w else None
            for c0 in range(0, len(h_b), CHUNK):
                h_c, rows = h_b[c0:c0 + CHUNK], max(0, min(CHUNK, n_b - c0))  # rows: the chunk's real ones
                t_c = targets_N[b0 + c0:b0 + c0 + rows, None]
                logits = (h_c @ w.mT).float()
                lse = logits.logsumexp(-1, keepdim=True)
                total += _chunk_loss(logits, lse, t_c, rows, g_b is not None, avoiding)
                if g_b is not None:
                    g_b[c0:c0 + len(h_c)] = logits.mul_(1.0 / N)  # the gradient, left in place of the logits
            if need_h:
                dh_ND[b0:b0 + n_b] = (g_b @ w)[:n_b]
            if need_w:  # one product a block (k2-small's 2,048 rows: one, rounded once as unfused)
                dw_VD.copy_(g_b.mT @ h_b) if b0 == 0 else dw_VD.add_(g_b.mT @ h_b)
        ctx.save_for_backward(dh_ND, dw_VD)
        return (total / N).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_loss):
        dh_ND, dw_VD = ctx.saved_tensors
        if not bool(d_loss == 1):  # 1 unless the loss was scaled (accumulation)
            dh_ND, dw_VD = (None if g is None else g * d_loss.to(g.dtype) for g in (dh_ND, dw_VD))
        return dh_ND, dw_VD, None, None, None


def _chunk_loss(logits, lse, t_c, rows: int, grad: bool, avoiding: bool) -> torch.Tensor:
    """The summed loss of a chunk's `rows` real rows; with `grad`, the logits' gradient (unscaled) written
    in place of `logits` (rows past `rows`: 0). With `avoiding` (the batch holds avoided targets), an
    avoided row's loss is taken as lse - lse', lse' the log-sum-exp without the avoided token, and its
    gradient as p - p', p' the softmax without it: the same as from 1 - p_a, and exact however close
    p_a comes to 1. Without, the plain cross entropy's operations alone (pretraining's path)."""
    if avoiding:
        avoid = (t_c <= AVOID)[:, 0]
        t_c = torch.where(avoid[:, None], AVOID - t_c, t_c)
        at = avoid.nonzero()[:, 0]
        z = logits[at].scatter_(1, t_c[at], float("-inf"))  # the avoided rows' logits without their token
        rest = z.logsumexp(-1, keepdim=True)
    loss = lse[:rows, 0] - logits[:rows].gather(1, t_c)[:, 0]
    if avoiding:
        loss[at] = lse[at, 0] - rest[:, 0]
    if grad:
        p = logits.sub_(lse).exp_()  # softmax, in place of the logits
        p[rows:] = 0
        p[:rows].scatter_add_(1, t_c, torch.where(avoid, 0.0, -1.0)[:, None] if avoiding
                              else p.new_full(t_c.shape, -1.0))
        if avoiding:
            p[at] -= z.sub_(rest).exp_()
    return loss.sum()


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) of the logits h_ND @ w_VDᵀ, which are never held whole; every
    row has a target (the caller drops the others before its norm; no rows: nan, as `F.cross_entropy`)."""
    return LinearCrossEntropy.apply(h_ND, w_VD, targets_N, matmul_dtype(h_ND), torch.is_grad_enabled())
