"""Expert parallelism and FSDP2 inside the training loop (`openk2 train --ep N --fsdp` under
torchrun): what the loop asks of them, so that the loop itself changes by a few lines.

The world splits into groups of `ep` consecutive ranks, each holding all experts between them
(`shard_experts` over the "ep" dimension of a `DeviceMesh` (world / ep, ep)); the groups are data
parallel replicas. DDP averages the replicated gradients and is told to leave the experts alone;
an expert's gradient already sums its EP group's tokens (through the all-to-all's backward), so
`clip` first sums it over the replicas and divides by the world, making it the global mean's
gradient like every other, then clips by the whole model's norm. Muon orthogonalises each rank's
experts on that rank. A checkpoint is what one process would write: the whole model as a Hugging
Face folder and the whole optimizer state (the experts' parts gathered over the EP group), so a run
resumes at another --ep and number of processes (4 → 2 → 1), keeping the global batch. Gathering onto
one rank suits the models this machine trains; at K2's size each rank writes its own shard instead
(`--checkpoint-format dcp`: `torch.distributed.checkpoint`, each expert stack described by `view` as
this rank's rows of the whole), which also resumes at any size.

`--fsdp` replaces DDP with FSDP2: every decoder layer and the root are `fully_shard`ed over all
ranks (each dense parameter a DTensor of 1/world of its rows; gathered for the forward and backward,
gradients reduce-scattered as their mean), the experts left to EP when --ep > 1. Muon gathers each
whole matrix onto one rank for Newton–Schulz and scatters its rows back; its state and AdamW's are
sharded like the parameters; QK-Clip scales the rows each rank holds. Checkpoints are then DCP's.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from openk2.model.transformer import Transformer
from openk2.optim.groups import muon_param_groups
from openk2.parallel.ep import clip_grad_norm, ep_param_groups, gather_experts, gather_rows, is_expert, shard_experts


class ParallelTraining:
    def __init__(self, model: Transformer, ep: int, world: int, device_type: str = "cpu", fsdp: bool = False):
        experts = model.cfg.n_routed_experts or 0
        if ep < 1 or world % ep or (experts and experts % ep):
            raise ValueError(f"--ep {ep} must divide the number of processes ({world}) and of experts ({experts})")
        self.ep, self.world, self.fsdp = ep, world, fsdp
        self.mesh = mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp") if world > ep else None
        self.ep_rank = dist.get_rank(self.ep_group)
        self.saves = 0 in dist.get_process_group_ranks(self.ep_group)  # the EP group that gathers checkpoints
        experts = {}
        if ep > 1:
            shard_experts(model, self.ep_group)
            experts = {name: p for name, p in model.named_parameters() if is_expert(name)}
        self.expert_ids = {id(p) for p in experts.values()}
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            everyone = init_device_mesh(device_type, (world,), mesh_dim_names=("world",))
            ignored = set(experts.values())
            for layer in model.layers:
                fully_shard(layer, mesh=everyone, ignored_params=ignored & set(layer.parameters()))
            # the root resharded after every forward too (an evaluation has no backward to do it), so its
            # parameters are always the sharded ones the optimizer and checkpoints hold
            fully_shard(model, mesh=everyone, ignored_params=ignored, reshard_after_forward=True)
        else:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(experts))

    def wrap(self, model):
        """What the loop calls forward on: DDP over the model, or the FSDP2 model itself."""
        return model if self.fsdp else torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def sync_next_backward(self, model, ddp, sync: bool):
        """A context for one micro-batch's backward: gradients reduced over the ranks only when `sync`."""
        if self.fsdp:
            model.set_requires_gradient_sync(sync)
            return nullcontext()
        return nullcontext() if sync else ddp.no_sync()

    def view(self, name: str, t: torch.Tensor):
        """What part of the whole a tensor of parameter `name` (its weight or optimizer state) is, for a
        sharded checkpoint (`openk2.checkpoint.sharded`): an expert stack under EP is this rank's rows
        of the whole, the same on every data-parallel replica (FSDP2 leaves experts to EP); a DTensor
        (FSDP2) says so itself; anything else is whole on every rank."""
        if self.ep == 1 or not is_expert(name):
            return t
        return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def param_groups(self, model) -> list[dict]:
        return ep_param_groups(model) if self.ep > 1 else muon_param_groups(model)

    def clip(self, model, max_norm: float) -> torch.Tensor:
        """The experts' gradients made the global mean's (see above), then clipping by the whole norm."""
        for p in model.parameters():
            if id(p) in self.expert_ids:
                if p.grad is None:  # no token reached this rank's experts: a zero gradient, as one process has
                    p.grad = torch.zeros_like(p)  # (and every replica joins the sum below)
                if self.dp_group is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(self.world)
        return clip_grad_norm(model, max_norm or float("inf"), self.ep_group, self.expert_ids)

    def whole(self, model: Transformer) -> Transformer | None:
        """The full model (every expert) for the checkpoint, built on rank 0 (None elsewhere): collective
        over rank 0's EP group (the other groups hold copies of the same experts: they skip it)."""
        if not self.saves:
            return None
        experts = gather_experts(model, self.ep_group, to=0)
        if dist.get_rank() != 0:
            return None
        with torch.device("meta"):
            full = Transformer(model.cfg)
        full = full.to_empty(device=model.lm_head.weight.device)
        state = {n: t for n, t in model.state_dict().items() if not is_expert(n)} | experts
        full.load_state_dict(state, strict=False)  # non-persistent buffers are recomputed below
        full.init_buffers()
        return full

    def whole_optimizer_state(self, opt) -> dict:
        """`opt.state_dict()` as one process training the whole model would have it, on rank 0 (None
        elsewhere): each expert's state tensors gathered there over its EP group (collective, as
        `whole`), no group marked `local`. Checkpoints hold this, so a run resumes at any --ep and
        number of processes."""
        if not self.saves:
            return None
        sd = opt.state_dict()
        flat = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(flat):
            if id(p) not in self.expert_ids:
                continue
            entry = sd["state"][i] = dict(sd["state"].get(i, {}))  # a copy: state_dict() shares the live state
            for key, t in entry.items():
                if torch.is_tensor(t) and t.dim() and t.shape == p.shape:
                    entry[key] = gather_rows(t, self.ep_group, to=0)
        if dist.get_rank() != 0:
            return None
        sd["param_groups"] = [{**g, "local": False} for g in sd["param_groups"]]
        return sd

    def local_optimizer_state(self, whole: dict, opt) -> dict:
        """The inverse: this rank's slice of each expert's state, and this run's `local` marks."""
        flat = [p for g in opt.param_groups for p in g["params"]]
        state = {}
        for i, entry in whole["state"].items():
            p = flat[int(i)]
            if id(p) in self.expert_ids:
                first = self.ep_rank * p.shape[0]
                entry = {key: t[first:first + p.shape[0]] if torch.is_tensor(t) and t.dim() else t
                         for key, t in entry.items()}
            state[i] = entry
        groups = [{**saved, "local": mine.get("local", False)} for saved, mine in zip(whole["param_groups"],
                                                                                     opt.param_groups)]
        return {"state": state, "param_groups": groups}
