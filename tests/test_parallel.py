"""Expert parallelism (openk2.parallel) with gloo on CPU: 2 and 4 processes, EP 2 / 4 and EP×DP 2×2.
Each rank takes its block of the global batch; the losses, every expert's gradient and every
replicated gradient equal one process's at the same global batch (fp32, to 1e-5), and so do the
expert loads; and three optimizer steps (gradient clipping on the whole model's norm, then Muon with
each rank orthogonalising its own experts) leave every weight where one process's steps do, to 1e-4
at K2's lr of 2e-4 (a step moves a weight by up to ~1e-3; Newton–Schulz in bf16 and AdamW's first
steps turn last-bit gradient differences into differences of that order, as with DDP)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from openk2.config import PRESETS
from openk2.model import build_model, lm_loss
from openk2.model.moe import MoE
from openk2.optim import Muon, muon_param_groups
from openk2.parallel import clip_grad_norm, ep_param_groups, gather_experts, shard_experts, sync_grads

CFG = dataclasses.replace(PRESETS["k2-tiny"], n_routed_experts=16, num_experts_per_tok=4)
BATCH, SEQ = 8, 12  # the global batch: 8 rows, split over the data ranks (every rank is one)


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _loads(model):
    return torch.stack([m.load for m in model.modules() if isinstance(m, MoE)])


STEPS, CLIP, LR = 3, 0.5, 2e-4  # a clip that binds (the raw norm is ~1.5); K2's peak lr


def _worker(rank: int, world: int, ep: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))
        model = shard_experts(build_model(CFG, seed=0), mesh.get_group("ep"))
        ids, targets = (t.chunk(world)[rank] for t in _batch())
        loss = lm_loss(model(ids), targets)
        (loss / world).backward()
        dp = mesh.get_group("dp") if world > ep else None
        sync_grads(model, dp)
        loads = _loads(model)
        dist.all_reduce(loads)
        experts = gather_experts(model, mesh.get_group("ep"), grads=True)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n not in experts}
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        opt = Muon(ep_param_groups(model), lr=LR)
        norms = []
        for step in range(STEPS):
            if step:
                model.zero_grad(set_to_none=True)
                (lm_loss(model(ids), targets) / world).backward()
                sync_grads(model, dp)
            norms.append(clip_grad_norm(model, CLIP, mesh.get_group("ep")))
            opt.step()
        weights = {n: p.detach() for n, p in model.named_parameters()} | gather_experts(model, mesh.get_group("ep"))
        torch.save(dict(losses=losses, grads={**grads, **experts}, loads=loads, norms=norms, weights=weights,
                        local=sum(p.numel() for p in model.parameters())), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single():
    model = build_model(CFG, seed=0)
    ids, targets = _batch()
    loss = lm_loss(model(ids), targets)
    loss.backward()
    grads, loads = {n: p.grad.clone() for n, p in model.named_parameters()}, _loads(model)
    opt, norms = Muon(muon_param_groups(model), lr=LR), []
    for step in range(STEPS):
        if step:
            model.zero_grad(set_to_none=True)
            lm_loss(model(ids), targets).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        opt.step()
    return loss.detach(), grads, loads, norms, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "ep2xdp2"])
def test_expert_parallel_equals_one_process(single, tmp_path, world, ep):
    mp.spawn(_worker, args=(world, ep, str(tmp_path)), nprocs=world)
    loss, grads, loads, norms, weights = single
    assert norms[0] > CLIP
    full = sum(g.numel() for g in grads.values())
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(torch.stack(got["losses"]).mean(), loss, atol=1e-5, rtol=0)
        assert got["grads"].keys() == grads.keys()
        for name, want in grads.items():  # every expert's gradient, and every replicated one
            torch.testing.assert_close(got["grads"][name], want, atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(got["loads"], loads)
        torch.testing.assert_close(torch.stack(got["norms"]), torch.stack(norms), atol=1e-5, rtol=1e-5)
        for name, want in weights.items():  # after the optimizer steps (measured: ≤ 4.4e-5)
            torch.testing.assert_close(got["weights"][name], want, atol=1e-4, rtol=0, msg=name)
        experts = sum(g.numel() for n, g in grads.items() if ".mlp.experts." in n)
        assert got["local"] == full - experts + experts // ep  # each rank holds 1/ep of the experts
