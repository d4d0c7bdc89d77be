"""Expert parallelism inside the training loop (`openk2 train --ep N` under torchrun): what the loop
asks of it, so that the loop itself changes by a few lines.

The world splits into groups of `ep` consecutive ranks, each holding all experts between them
(`shard_experts` over the "ep" dimension of a `DeviceMesh` (world / ep, ep)); the groups are data
parallel replicas. DDP averages the replicated gradients and is told to leave the experts alone;
an expert's gradient already sums its EP group's tokens (through the all-to-all's backward), so
`clip` first sums it over the replicas and divides by the world, making it the global mean's
gradient like every other, then clips by the whole model's norm. Muon orthogonalises each rank's
experts on that rank. Checkpoints stay one Hugging Face folder of the whole model (the experts
gathered), plus each rank's optimizer state beside `train_state.pt` (`optimizer.rank{r}.pt`):
resuming needs the same world size and `--ep`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from openk2.model.transformer import Transformer
from openk2.parallel.ep import clip_grad_norm, ep_param_groups, gather_experts, is_expert, shard_experts


class ExpertParallelTraining:
    def __init__(self, model: Transformer, ep: int, world: int, device_type: str = "cpu"):
        experts = model.cfg.n_routed_experts or 0
        if ep < 1 or world % ep or (experts and experts % ep):
            raise ValueError(f"--ep {ep} must divide the number of processes ({world}) and of experts ({experts})")
        self.ep, self.world, self.rank = ep, world, dist.get_rank()
        mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        self.ep_group, self.dp_group = mesh.get_group("ep"), mesh.get_group("dp") if world > ep else None
        shard_experts(model, self.ep_group)
        ignore = [name for name, _ in model.named_parameters() if is_expert(name)]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)

    def param_groups(self, model) -> list[dict]:
        return ep_param_groups(model)

    def clip(self, model, max_norm: float) -> torch.Tensor:
        """The experts' gradients made the global mean's (see above), then clipping by the whole norm."""
        for name, p in model.named_parameters():
            if is_expert(name) and p.grad is not None:
                if self.dp_group is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(self.world)
        return clip_grad_norm(model, max_norm or float("inf"), self.ep_group)

    def whole(self, model: Transformer) -> Transformer:
        """The full model (every expert) on every rank, for the checkpoint: collective."""
        experts = gather_experts(model, self.ep_group)
        with torch.device("meta"):
            full = Transformer(model.cfg)
        full = full.to_empty(device=model.lm_head.weight.device)
        state = {n: t for n, t in model.state_dict().items() if not is_expert(n)} | experts
        full.load_state_dict(state, strict=False)  # non-persistent buffers are recomputed below
        full.init_buffers()
        return full

    def save_optimizer(self, opt, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"ep": self.ep, "world": self.world, "optimizer": opt.state_dict()},
                   folder / f"optimizer.rank{self.rank}.pt")
        dist.barrier()  # every rank's file is written before rank 0 marks the checkpoint complete

    def load_optimizer(self, opt, folder: Path) -> None:
        path = folder / f"optimizer.rank{self.rank}.pt"
        saved = torch.load(path, weights_only=False) if path.is_file() else None
        if not saved or (saved["ep"], saved["world"]) != (self.ep, self.world):
            was = f"--ep {saved['ep']} on {saved['world']} processes" if saved else "without --ep"
            raise ValueError(f"--resume from {folder}: it was trained {was}; resume with the same --ep and "
                             f"number of processes, or start a new run from its weights")
        opt.load_state_dict(saved["optimizer"])
