"""Mixture of experts: noaux_tc router, routed experts (reference loop + grouped), shared experts.

Router (K2-SPEC §3.6): sigmoid scores in fp32; `e_score_correction_bias` is added for *selection*
only; optional group-limited top-k; weights are the unbiased scores, normalised, then scaled by
`routed_scaling_factor`. Routed experts are stacked (gate+up [E, 2F, D], down [E, D, F]) so that one
grouped matmul serves all experts; `LocalDispatcher` sorts tokens by expert and puts them back, the seam
expert parallelism will swap. `Experts.forward_reference` is the obviously-correct loop that
tests/test_model.py binds to the grouped path. Each forward leaves per-expert token counts in
`MoE.load` (for balancing and diagnostics). `MoE.decode` is the compiled decode step's form of the
same layer: multiply-and-reduce over only the chosen experts at small batches, dense experts above.

    N tokens  D hidden  E routed experts  K experts per token  G expert groups  F expert hidden
    M = N·K (token, expert) pairs, sorted by expert
"""

import torch
import torch.nn.functional as F
from torch import nn

from openk2.config import ModelConfig
from openk2.model.expert_loop import ExpertLoop, swiglu_rows
from openk2.model.linear import decode_linear, decode_weights, experts_kernel, pairs_kernel, pairs_matvec
from openk2.model.rows import matmul_dtype


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode(self, x_ND, small: bool):
        """`forward` in the compiled decode step's form (`decode_linear`)."""
        h_NF = F.silu(decode_linear(self.gate_proj, x_ND, small)) * decode_linear(self.up_proj, x_ND, small)
        return decode_linear(self.down_proj, h_NF, small)


def route(logits_NE, bias_E, cfg: ModelConfig):
    """Expert choice from router logits: (topk_idx [N, K], topk_weight [N, K] fp32)."""
    N, E = logits_NE.shape
    G, K = cfg.n_group, cfg.num_experts_per_tok
    scores_NE = logits_NE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_NE.softmax(-1)
    choice_NE = scores_NE + bias_E
    if G > 1:  # keep the topk_group groups whose two best experts score highest
        group_NG = choice_NE.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep_NG = torch.zeros_like(group_NG, dtype=torch.bool)
        keep_NG.scatter_(1, group_NG.topk(cfg.topk_group, dim=-1).indices, True)
        # -inf as DeepSeek's reference (transformers uses 0.0: differs only if biased scores go negative)
        choice_NE = choice_NE.masked_fill(~keep_NG.repeat_interleave(E // G, dim=1), float("-inf"))
    topk_idx_NK = choice_NE.topk(K, dim=-1, sorted=False).indices
    topk_w_NK = scores_NE.gather(1, topk_idx_NK)
    if cfg.norm_topk_prob:
        topk_w_NK = topk_w_NK / (topk_w_NK.sum(-1, keepdim=True) + 1e-20)
    return topk_idx_NK, topk_w_NK * cfg.routed_scaling_factor


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # steers selection only; updated by the balancing rule, never by gradient
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x_ND):
        """(topk_idx [N, K], topk_weight [N, K], logits [N, E]); fp32, as the reference (the casts
        are no-ops after `cast`)."""
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        return *route(logits_NE, self.e_score_correction_bias.float(), self.cfg), logits_NE


def seq_aux_loss(logits_NE, topk_idx_NK, batch: int, cfg: ModelConfig) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss (arXiv:2412.19437 §2.1.2), averaged over sequences:
    Σ_e f_e·P_e with f_e = E/(K·S)·#{tokens routing to e}, P_e = mean over tokens of s_e / Σ_j s_j."""
    E = cfg.n_routed_experts
    scores_NE = logits_NE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_NE.softmax(-1)
    p_BE = (scores_NE / scores_NE.sum(-1, keepdim=True)).view(batch, -1, E).mean(1)
    idx_BX = topk_idx_NK.view(batch, -1)
    counts_BE = torch.zeros_like(p_BE).scatter_add_(1, idx_BX, torch.ones_like(idx_BX, dtype=p_BE.dtype))
    f_BE = counts_BE * E / idx_BX.shape[1]  # idx_BX.shape[1] = K·S
    return (f_BE * p_BE).sum(-1).mean()


class LocalDispatcher:
    """Sort (token, slot) pairs by expert so each expert sees one contiguous slice, then undo it."""

    def dispatch(self, x_ND, topk_idx_NK, topk_w_NK, n_experts: int):
        flat_M = topk_idx_NK.flatten()
        order_M = flat_M.argsort(stable=True)
        counts_E = torch.bincount(flat_M, minlength=n_experts)
        x_MD = x_ND.index_select(0, order_M // topk_idx_NK.shape[1])
        w_M = topk_w_NK.flatten().index_select(0, order_M).to(x_ND.dtype)
        return x_MD, counts_E, w_M, order_M

    def combine(self, y_MD, order_M, n_tokens: int, k: int):
        out_ND = y_MD.new_zeros(n_tokens, y_MD.shape[-1])
        return out_ND.index_add_(0, order_M // k, y_MD)


def swiglu_by_kernel(x_MD, counts_E, w_M, gate_up, gate_up_scale, down, down_scale) -> torch.Tensor | None:
    """Eager experts' rows (x_MD sorted by expert, counts_E[e] rows each, each scaled by w_M) through
    the kernel `experts_kernel` picks for the stacks, or None where it picks none (a matmul per expert)."""
    kernel = experts_kernel(x_MD, int((counts_E > 0).sum()), gate_up, gate_up_scale, down, down_scale)
    if kernel is None:
        return None
    idx_M = torch.repeat_interleave(torch.arange(len(counts_E), device=x_MD.device), counts_E)
    return kernel_swiglu(kernel, x_MD, idx_M, gate_up, gate_up_scale, down, down_scale).mul_(w_M[:, None])


def kernel_swiglu(kernel, x_MD, idx_M, gate_up, gate_up_scale, down, down_scale) -> torch.Tensor:
    """Row m of x through the SwiGLU of expert idx_M[m] of the stacks, by a registered pairs kernel
    (`openk2.model.linear.PAIRS_KERNELS`): each chosen expert read once for all its rows."""
    gate, up = kernel(x_MD, gate_up, gate_up_scale, idx_M).chunk(2, dim=-1)
    return kernel((F.silu(gate) * up).to(x_MD.dtype), down, down_scale, idx_M).to(x_MD.dtype)


class Experts(nn.Module):
    """E SwiGLU experts, stacked: gate and up fused as gate_up_proj [E, 2F, D] (gate rows first),
    down_proj [E, D, F]. HF stores them one by one (`experts.{e}.gate_proj.weight`, ...)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_MD, counts_E, w_M, grouped: bool | None = None):
        """Rows of x_MD sorted by expert (counts_E[e] rows each), each scaled by its weight w_M.

        grouped: one `grouped_mm` for all experts. It is a fused kernel for bf16 on CUDA; on CPU it
        loops over every expert internally and runs slower than one matmul per used expert
        (bench/forward.py), so the default (None) picks it for bf16 CUDA tensors only.
        """
        if grouped is None:
            grouped = x_MD.is_cuda and x_MD.dtype == torch.bfloat16
        if grouped:
            offs_E = counts_E.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(x_MD, self.gate_up_proj.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
            h_MF = F.silu(gate).mul_(up).mul_(w_M[:, None])  # scale the F-wide hidden, not the output
            return F.grouped_mm(h_MF, self.down_proj.transpose(1, 2), offs=offs_E)
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        y_MD = swiglu_by_kernel(x_MD, counts_E, w_M, w_gate_up, None, w_down, None)
        if y_MD is not None:
            return y_MD
        if torch.is_grad_enabled() and any(t.requires_grad for t in (w_gate_up, w_down, x_MD, w_M)):
            # training: the loop with a hand-written backward (autograd through slices of the stacks
            # back-propagates a zero-filled or stacked copy of each whole stack, once per expert)
            return ExpertLoop.apply(x_MD, w_M, w_gate_up, w_down, counts_E.tolist(), matmul_dtype(x_MD))
        out = [swiglu_rows(x, w_gate_up[e], w_down[e], matmul_dtype(x))[1]
               for e, x in enumerate(x_MD.split(counts_E.tolist())) if len(x)]
        return torch.cat(out).mul_(w_M[:, None])

    @property
    def decode_weights(self):
        """The face the decode step reads (openk2.model.linear): float weights, no scales."""
        return self.gate_up_proj, None, self.down_proj, None

    def forward_reference(self, x_ND, topk_idx_NK, topk_w_NK):
        """The specification: for each expert, its tokens through its SwiGLU, weighted, summed."""
        F_ = self.down_proj.shape[-1]

        def swiglu(e, x):
            w_gate, w_up = self.gate_up_proj[e, :F_], self.gate_up_proj[e, F_:]
            return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ self.down_proj[e].T
        return routed_reference(x_ND, topk_idx_NK, topk_w_NK, self.gate_up_proj.shape[0], swiglu)


def routed_reference(x_ND, topk_idx_NK, topk_w_NK, n_experts: int, expert) -> torch.Tensor:
    """The routing reference every experts module shares: for each expert e, its tokens through
    expert(e, x) (that module's SwiGLU), weighted by their routing weight, summed per token."""
    out_ND = torch.zeros_like(x_ND)
    for e in range(n_experts):
        tok, slot = torch.where(topk_idx_NK == e)
        if tok.numel() == 0:
            continue
        y = expert(e, x_ND[tok])
        out_ND.index_add_(0, tok, y * topk_w_NK[tok, slot, None].to(y.dtype))
    return out_ND


# --- the decode step's forms (`MoE.decode`), written for torch.compile -----------------------------
def small_batch(rows: int, cfg: ModelConfig) -> bool:
    """Few enough rows that the chosen (token, expert) pairs read less than half of the experts:
    multiply-and-reduce everywhere. Above it, library matmuls and dense experts."""
    return rows * cfg.num_experts_per_tok <= cfg.n_routed_experts // 2


def _experts_pairs(experts: nn.Module, x_ND, idx_NK, w_NK):
    """Only the chosen experts' weights, one multiply-and-reduce per (token, expert) pair, through the
    experts' face (int8 codes: scaled per row after the sum) and the kernel registered for it if any."""
    N, K = idx_NK.shape
    flat_M = idx_NK.flatten()
    x_MD = x_ND.repeat_interleave(K, 0)
    gate_up, gate_up_scale, down, down_scale = decode_weights(experts)
    gate, up = pairs_matvec(x_MD, gate_up, gate_up_scale, flat_M).chunk(2, -1)
    h_MF = (F.silu(gate) * up * w_NK.flatten()[:, None]).to(x_ND.dtype)
    return pairs_matvec(h_MF, down, down_scale, flat_M).view(N, K, -1).sum(1).to(x_ND.dtype)


def _experts_dense(experts: "Experts", x_ND, idx_NK, w_NK):
    """Every expert on every row, weighted by the dense routing weights (zero where not chosen): every
    expert is read once anyway when N·K ≫ E, and weight-first batched matmuls reach the machine's
    bandwidth. Float experts only (a quantized model keeps its own kernels at these batch sizes)."""
    (N, D), E = x_ND.shape, experts.gate_up_proj.shape[0]
    w_NE = torch.zeros(N, E, dtype=w_NK.dtype, device=x_ND.device).scatter(1, idx_NK, w_NK)
    gate, up = torch.bmm(experts.gate_up_proj, x_ND.T.expand(E, D, N)).chunk(2, 1)  # [E, F, N] each
    h_EFN = (F.silu(gate.float()) * up.float() * w_NE.T[:, None, :]).to(x_ND.dtype)
    return torch.matmul(experts.down_proj, h_EFN).sum(0, dtype=torch.float32).T.to(x_ND.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.dispatcher = LocalDispatcher()
        self.load: torch.Tensor | None = None  # [E] tokens routed to each expert by the last forward
        self.record_aux_loss = False
        self.counted: torch.Tensor | None = None  # [N] bool: the tokens `load` counts (packed rows: not padding)
        self.aux_loss: torch.Tensor | None = None  # seq_aux_loss of the last forward, when recording

    def forward(self, x_BSD, reference: bool = False, grouped: bool | None = None):
        x_ND = x_BSD.reshape(-1, x_BSD.shape[-1])
        topk_idx_NK, topk_w_NK, logits_NE = self.gate(x_ND)
        if self.record_aux_loss:
            self.aux_loss = seq_aux_loss(logits_NE, topk_idx_NK, x_BSD.shape[0], self.cfg)
        if reference:
            y_ND = self.experts.forward_reference(x_ND, topk_idx_NK, topk_w_NK)
            self.load = torch.bincount(topk_idx_NK.flatten(), minlength=self.cfg.n_routed_experts)
        else:
            x_in = x_ND  # the CPU loop under autocast casts its rows anyway: cast N of them here, not N·k
            # (the routing weights follow x's dtype in `dispatch`; the loop's products were bf16 already)
            if torch.is_grad_enabled() and x_ND.device.type == "cpu" and not grouped:
                x_in = x_ND.to(matmul_dtype(x_ND))
            x_MD, counts_E, w_M, order_M = self.dispatcher.dispatch(
                x_in, topk_idx_NK, topk_w_NK, self.cfg.n_routed_experts)
            y_MD = self.experts(x_MD, counts_E, w_M, grouped)
            y_ND = self.dispatcher.combine(y_MD, order_M, x_ND.shape[0], self.cfg.num_experts_per_tok)
            self.load = counts_E
        if self.counted is not None:
            self.load = torch.bincount(topk_idx_NK[self.counted].flatten(), minlength=self.cfg.n_routed_experts)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return y_ND.view_as(x_BSD)

    def decode(self, x_ND, small: bool):
        """`forward` for the decode step, in the form torch.compile fuses: the same fp32 routing, then
        the chosen pairs (small batches, or any batch where a grouped kernel is registered for the
        experts' weights) or all experts densely, plus the shared experts; no `load`.
        Its reference is `forward` (tests/test_decode.py binds whole steps)."""
        logits_NE = F.linear(x_ND.float(), self.gate.weight.float())
        idx_NK, w_NK = route(logits_NE, self.gate.e_score_correction_bias.float(), self.cfg)
        # past small batches, pairs only through a grouped kernel (each chosen expert read once, all its rows)
        if small or pairs_kernel(decode_weights(self.experts)[0]) is not None:
            y_ND = _experts_pairs(self.experts, x_ND, idx_NK, w_NK)
        else:
            y_ND = _experts_dense(self.experts, x_ND, idx_NK, w_NK)
        return y_ND + self.shared_experts.decode(x_ND, small) if self.shared_experts is not None else y_ND
