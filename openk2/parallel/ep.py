"""Expert parallelism: each rank of an EP group holds E/W of every MoE layer's routed experts, and
tokens travel to the rank that owns their expert and back, over all-to-all.

Applied from outside the model (`shard_experts(model, group)`): each MoE layer's `Experts` is cut to
this rank's slice and its dispatcher (the seam `openk2.model.moe.LocalDispatcher` marks) is replaced by
`ExpertParallelDispatcher`. The router and the shared experts stay replicated. Per layer and step:

1. as the local dispatcher: sort this rank's (token, slot) pairs by expert; count rows per expert;
2. exchange the counts (all-to-all of [W, E/W] counts: rank r learns how many rows each rank sends
   to each of its experts), then the rows and their routing weights (differentiable all-to-all:
   gradients flow back to the sender's router and activations);
3. sort the received rows by local expert and run the local experts;
4. send the outputs back the way they came, and add them into the tokens.

Gradients: each expert's gradient collects every rank's tokens through the all-to-all's backward,
so with the loss of rank r taken as (its mean) / W, an expert's gradient is already the global one
within its EP group; replicated parameters (everything else) need their gradients summed over the
ranks (`sync_grads`), and experts over the data-parallel replicas, if any (tests/test_parallel.py
binds both to a single process's gradients at the same global batch).

    N tokens  K experts per token  M = N·K pairs  E experts  W ranks in the EP group  L = E/W local
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol  # the differentiable all-to-all
from torch import nn

from openk2.model.moe import Experts, MoE
from openk2.optim.groups import muon_param_groups
from openk2.optim.muon import is_sharded, local_part


class _Route:
    """What `combine` needs to undo a `dispatch` (MoE.forward passes it through as `order_M`)."""

    def __init__(self, order_M, unsort_M, send_W, recv_W):
        self.order_M, self.unsort_M, self.send_W, self.recv_W = order_M, unsort_M, send_W, recv_W


class ExpertParallelDispatcher:
    """LocalDispatcher's interface over an EP group: `dispatch` returns the rows this rank's experts
    must process (from every rank), sorted by local expert, with their counts [L] and weights."""

    def __init__(self, group: dist.ProcessGroup | None, n_experts: int):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.world:
            raise ValueError(f"{n_experts} experts do not split evenly over an EP group of {self.world}")
        self.local = n_experts // self.world
        self.counts_E: torch.Tensor | None = None  # this rank's tokens per expert, all E (the layer's `load`)

    def dispatch(self, x_ND, topk_idx_NK, topk_w_NK, n_experts: int):
        W, L = self.world, self.local
        flat_M = topk_idx_NK.flatten()
        order_M = flat_M.argsort(stable=True)
        self.counts_E = torch.bincount(flat_M, minlength=n_experts)
        x_MD = x_ND.index_select(0, order_M // topk_idx_NK.shape[1])
        w_M = topk_w_NK.flatten().index_select(0, order_M).to(x_ND.dtype)
        recv_WL = torch.empty_like(self.counts_E)
        dist.all_to_all_single(recv_WL, self.counts_E, group=self.group)  # [W·L]: rows from rank s to expert l
        recv_WL = recv_WL.view(W, L)
        send_W, recv_W = self.counts_E.view(W, L).sum(1).tolist(), recv_WL.sum(1).tolist()
        # rows and weights in one exchange: one collective per direction and layer, so every rank's
        # backward meets the same collectives in the same order
        xw_RD = self._exchange(torch.cat([x_MD, w_M[:, None]], 1), recv_W, send_W)
        x_RD, w_R = xw_RD[:, :-1], xw_RD[:, -1]
        # received rows come grouped by sender, each sender's by local expert: sort them by expert
        expert_R = torch.arange(L, device=x_ND.device).repeat(W).repeat_interleave(recv_WL.flatten())
        sort_R = expert_R.argsort(stable=True)
        route = _Route(order_M, sort_R.argsort(), send_W, recv_W)
        return x_RD.index_select(0, sort_R), recv_WL.sum(0), w_R.index_select(0, sort_R), route

    def combine(self, y_RD, route: _Route, n_tokens: int, k: int):
        y_MD = self._exchange(y_RD.index_select(0, route.unsort_M), route.send_W, route.recv_W)
        out_ND = y_MD.new_zeros(n_tokens, y_MD.shape[-1])
        return out_ND.index_add_(0, route.order_M // k, y_MD)

    def _exchange(self, x, out_splits: list[int], in_splits: list[int]):
        """x's rows, in_splits[r] of them to rank r, exchanged for out_splits[r] rows from each rank r;
        differentiable (the backward is the reverse exchange)."""
        group = self.group or dist.group.WORLD
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


class LocalExperts(Experts):
    """This rank's slice of a layer's experts: `count` of them from global id `first`. A rank that
    receives no rows still returns an (empty) output tied to its input, so that every rank's backward
    joins the combine's all-to-all."""

    def __init__(self, experts: Experts, first: int, count: int):
        nn.Module.__init__(self)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[first:first + count].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[first:first + count].clone())

    def forward(self, x_MD, counts_E, w_M, grouped: bool | None = None):
        if x_MD.shape[0] == 0:
            return x_MD * w_M[:, None]  # empty
        return super().forward(x_MD, counts_E, w_M, grouped)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Keep this rank's E/W experts of every MoE layer and dispatch over `group` (default: the world);
    in place, returns the model. Every rank must start from the same weights."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        dispatcher = ExpertParallelDispatcher(group, moe.cfg.n_routed_experts)
        moe.experts = LocalExperts(moe.experts, dispatcher.rank * dispatcher.local, dispatcher.local)
        moe.dispatcher = dispatcher
        moe.register_forward_hook(_load_of_all_experts)
    return model


def _load_of_all_experts(moe: MoE, args, output) -> None:
    """`MoE.load` counts this rank's tokens per expert over all E experts, as without EP (the local
    counts the dispatch returns are for the experts this rank holds)."""
    if moe.counted is None:
        moe.load = moe.dispatcher.counts_E


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def sync_grads(model: nn.Module, dp_group: dist.ProcessGroup | None = None) -> None:
    """Sum the gradients of replicated parameters over the world, and of experts over `dp_group` (the
    ranks that hold the same experts; None: no replicas). Call after each rank's backward of its
    loss / (number of ranks)."""
    for name, p in model.named_parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a rank none of whose tokens reached a parameter
        if not is_expert(name):
            dist.all_reduce(p.grad)
        elif dp_group is not None:
            dist.all_reduce(p.grad, group=dp_group)


def ep_param_groups(model: nn.Module, **kw) -> list[dict]:
    """`muon_param_groups` of a sharded model, its experts' groups marked `local`: each rank
    orthogonalises its own experts' matrices (the replicated ones are still split over the ranks)."""
    experts = {id(p) for name, p in model.named_parameters() if is_expert(name)}
    groups = muon_param_groups(model, **kw)
    for g in groups:
        if g["algo"] == "muon" and any(id(p) in experts for p in g["params"]):
            if not all(id(p) in experts for p in g["params"]):
                raise ValueError("a Muon group mixes experts with replicated matrices")
            g["local"] = True
    return groups


def clip_grad_norm(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None,
                   expert_ids: set[int] | None = None) -> torch.Tensor:
    """`clip_grad_norm_` over the whole model's gradient, of which each rank holds the experts' share
    (`expert_ids`, default: every parameter named as an expert) and, under FSDP2, a share of each
    DTensor's rows: the experts' squared norms are summed over the EP `group` and the DTensors' over
    the world, so every rank scales by the same factor. Returns the total norm."""
    whole, experts, rows = torch.zeros(()), torch.zeros(()), torch.zeros(())
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        norm2 = local_part(p.grad).detach().float().pow(2).sum().cpu()
        if is_sharded(p.grad):
            rows += norm2
        elif id(p) in expert_ids if expert_ids is not None else is_expert(name):
            experts += norm2
        else:
            whole += norm2
    dist.all_reduce(experts, group=group)
    if any(is_sharded(p) for p in model.parameters()):
        dist.all_reduce(rows)
    total = (whole + experts + rows).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            local_part(p.grad).mul_(scale.to(p.grad.device))
    return total


def gather_experts(model: nn.Module, group: dist.ProcessGroup | None = None, grads: bool = False,
                   to: int | None = None) -> dict:
    """{name: the full [E, ...] stack} of every layer's experts (their gradients if `grads`), gathered
    from the EP group onto every rank (for checks), or onto global rank `to` only ({} on the others:
    a checkpoint of the whole model, which one process writes)."""
    out = {}
    for name, p in model.named_parameters():
        if is_expert(name):
            t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
            out[name] = gather_rows(t, group, to)
    return {n: t for n, t in out.items() if t is not None}


def gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None, to: int | None = None) -> torch.Tensor | None:
    """The group's slices of one tensor, concatenated in group-rank order: on every rank, or on global
    rank `to` only (None on the others)."""
    mine = to is None or dist.get_rank() == to
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))] if mine else None
    if to is None:
        dist.all_gather(parts, t.contiguous(), group=group)
    else:
        dist.gather(t.contiguous(), parts, dst=to, group=group)
    return torch.cat(parts) if mine else None
