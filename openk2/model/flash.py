"""CPU's fused (flash) attention, composed where one call would do more work than needed.

`after_prefix`: a prefill chunk after its prefix (the Engine's chunked prefill, `MLA._materialised`).
`by_runs`: causal runs packed back to back (SFT's packed rows; each row of a pretraining batch is one
run), forward and backward: openk2's kernel (`packed_attention`) where it serves, else torch's fused
attention run by run.

    B batch  H heads  S queries  T keys  A head dim  O value head dim  N positions
"""

import torch
import torch.nn.functional as F

from openk2.model.rows import matmul_dtype, pad_rows

# (forward, backward) of `openk2::runs_attention`, registered by openk2.kernels where the CPU multiplies
# bf16 in AMX tiles; elsewhere torch's fused attention serves run by run (`by_runs`)
RUNS_KERNEL: tuple | None = None


class _Runs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_HNA, k_HNA, v_HNO, starts, scale):
        forward, ctx.backward = RUNS_KERNEL  # the backward of the kernel this forward ran
        out_HNO, lse_HN, top_H = forward(q_HNA, k_HNA, v_HNO, starts, scale)
        ctx.save_for_backward(q_HNA, k_HNA, v_HNO, out_HNO, lse_HN, starts)
        ctx.scale = scale
        ctx.mark_non_differentiable(top_H)
        return out_HNO, top_H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout_HNO, _):
        return *ctx.backward(dout_HNO, *ctx.saved_tensors, ctx.scale), None, None


def causal_max(q_XNA: torch.Tensor, k_XNA: torch.Tensor, n: int, block: int = 256) -> torch.Tensor:
    """Per-x max of q·kᵀ over the causal triangle of the first n positions (key ≤ query), in the
    product's dtype. Query rows go in blocks, each scored against the keys up to its last row: the
    scores above the diagonal blocks are never formed (about half of them), and only a diagonal block
    is masked. Rows past n (`pad_rows`' zeros) are scored, for a few product shapes, and left out."""
    N, tops = q_XNA.shape[1], []
    for i0 in range(0, n, block):
        i1 = min(N, i0 + block)
        s_XRK = q_XNA[:, i0:i1] @ k_XNA[:, :i1].transpose(-1, -2)
        rows = min(n, i1) - i0
        if i0:
            tops.append(s_XRK[:, :rows, :i0].amax(dim=(1, 2)))
        seen = torch.ones(rows, i1 - i0, dtype=torch.bool, device=s_XRK.device).tril()  # key ≤ query
        diag = s_XRK[:, :rows, i0:].masked_fill(~seen, float("-inf"))
        tops.append(diag.amax(dim=(1, 2)))
    return torch.stack(tops).amax(0)


def runs_kernel_serves(q_BHSA: torch.Tensor, runs: int) -> bool:
    """Whether `by_runs` takes openk2's kernel for q over `runs` runs: registered, on the CPU, products in
    bf16, a backward to come (training; inference's prefill keeps torch's fused forward, which is faster
    alone), and at least two (head, run) tasks per thread (the kernel's unit of parallel work)."""
    return RUNS_KERNEL is not None and q_BHSA.device.type == "cpu" and torch.is_grad_enabled() and \
        q_BHSA.requires_grad and matmul_dtype(q_BHSA) == torch.bfloat16 and \
        q_BHSA.shape[1] * runs >= 2 * torch.get_num_threads()


def by_runs(q_BHSA, k_BHSA, v_BHSO, runs, scale: float, record: bool):
    """Packed rows, one causal attention per run (a block-diagonal mask would score every key of the row
    and skip none: ~2.5x slower fwd+bwd at four 512-token runs per 2,048-token row): (out [B, H, S, O],
    each head's max scaled logit [H] fp32 if `record`, else None). openk2's kernel where it serves
    (`runs_kernel_serves`: all runs in one call, the max logit from its forward), else torch's fused
    attention run by run."""
    (B, H, S, A), O = q_BHSA.shape, v_BHSO.shape[-1]
    if runs_kernel_serves(q_BHSA, len(runs)):
        out_HNO, top_H = packed_attention(*(t.transpose(0, 1).reshape(H, B * S, -1) for t in (q_BHSA, k_BHSA, v_BHSO)),
                                          runs, scale)
        return out_HNO.view(H, B, S, O).transpose(0, 1), top_H if record else None
    v_BHSA = F.pad(v_BHSO, (0, A - O)) if A > O else v_BHSO  # CPU's fused kernel takes equal head dims
    q_R, k_R, v_R = (t.transpose(0, 1).reshape(H, B * S, A).split(runs, dim=1) for t in (q_BHSA, k_BHSA, v_BHSA))
    # each run padded at its end to `bucket_rows` on CPU: the kernels compile per shape (pad_rows);
    # causal, so no real query sees a padded key, and the padded queries' outputs are dropped
    dtype = matmul_dtype(q_BHSA)  # one decision for q, k and v (they may differ under autocast)
    q_R, k_R, v_R = ([pad_rows(t, dtype, dim=1) for t in ts] for ts in (q_R, k_R, v_R))
    top_H = None
    if record:
        with torch.no_grad():
            top_H = torch.stack([causal_max(q, k, n) for q, k, n in zip(q_R, k_R, runs)]).amax(0).float() * scale
    out_R = [F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)[0, :, :n]
             for q, k, v, n in zip(q_R, k_R, v_R, runs)]
    return torch.cat(out_R, dim=1).view(H, B, S, A).transpose(0, 1)[..., :O], top_H


def packed_attention(q_HNA, k_HNA, v_HNO, runs, scale: float):
    """Causal attention of each run of `runs` (lengths over the N positions, in order) within itself:
    (out [H, N, O] in bf16, each head's largest scaled score [H] fp32: QK-Clip's max logit). Inputs are
    taken in bf16; v's head dim may differ from q's."""
    starts = torch.tensor([0, *runs], dtype=torch.long).cumsum(0)
    q, k, v = (t.to(torch.bfloat16).contiguous() for t in (q_HNA, k_HNA, v_HNO))
    return _Runs.apply(q, k, v, starts, scale)


def after_prefix(q_BHSA, k_BHTA, v_BHTA, scale: float) -> torch.Tensor:
    """The attention of a prefill chunk's S queries, which follow T − S earlier keys, over all T keys (the
    mask `causal_mask(S, T, T − S)`): as two of CPU's fused (flash) attentions, over the earlier keys
    unmasked and over the chunk's own causally, merged by their log-sum-exps. With the mask, the fused
    kernel reads and applies it to every block and skips none (k2-small's 8 heads, bf16, 2 threads, 512
    queries after 3,488 keys: 18.7 -> 15.4 ms; after 1,536: 9.3 -> 7.9 ms)."""
    T, S = k_BHTA.shape[2], q_BHSA.shape[2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o1, lse1 = flash(q_BHSA, k_BHTA[:, :, :T - S], v_BHTA[:, :, :T - S], 0.0, False, scale=scale)
    o2, lse2 = flash(q_BHSA, k_BHTA[:, :, T - S:], v_BHTA[:, :, T - S:], 0.0, True, scale=scale)
    top = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - top).exp_()[..., None], (lse2 - top).exp_()[..., None]
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q_BHSA.dtype)
