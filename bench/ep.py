"""Expert parallelism on this machine: a training step of the same global batch in 1, 2 and 4 gloo
processes (EP = the number of processes), with the all-to-all traffic and the step's time split.

Per configuration: forward + backward of the `k2-mini` shape at a global batch of --batch × --seq
tokens, fp32, the median of --reps steps after one warm-up; each process runs one thread (the
machine's cores are shared: with more processes than cores the times say what communication and
oversubscription cost, not what more machines would gain). Bytes are what one rank's forward
all-to-alls send to other ranks (rows and routing weights out, outputs back); the backward sends
the same again. With --fsdp, each world above 1 runs twice: the dense weights replicated (their
gradients summed after the backward) and FSDP2-sharded over the processes (gathered for the forward
and the backward, gradients reduce-scattered during it), with the weights one process holds.

    .venv/bin/python bench/ep.py [--worlds 1 2 4] [--batch 8] [--seq 256] [--reps 3] [--fsdp]
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openk2.config import PRESETS
from openk2.model import build_model, lm_loss
from openk2.parallel import shard_experts, sync_grads
from openk2.parallel.ep import ExpertParallelDispatcher, is_expert

CFG = dataclasses.replace(PRESETS["k2-mini"], n_routed_experts=32)


class Timed(ExpertParallelDispatcher):
    """The dispatcher, counting the bytes it sends to other ranks and the seconds its forward exchanges take."""

    sent = 0
    seconds = 0.0

    def _exchange(self, x, out_splits, in_splits):
        t0 = time.perf_counter()
        out = super()._exchange(x, out_splits, in_splits)
        Timed.seconds += time.perf_counter() - t0
        Timed.sent += (sum(in_splits) - in_splits[self.rank]) * x[0].numel() * x.element_size()
        return out


def _run(rank: int, world: int, args, out_dir: str, fsdp: bool = False):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    model = build_model(CFG, seed=0)
    if world > 1:
        shard_experts(model)
        for m in model.modules():
            if isinstance(getattr(m, "dispatcher", None), ExpertParallelDispatcher):
                m.dispatcher.__class__ = Timed
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh, experts = init_device_mesh("cpu", (world,)), {p for n, p in model.named_parameters() if is_expert(n)}
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=experts & set(layer.parameters()))
        fully_shard(model, mesh=mesh, ignored_params=experts)
    held = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (args.batch, args.seq + 1), generator=g).chunk(world)[rank]
    rows = []
    for _ in range(args.reps + 1):
        Timed.sent, Timed.seconds = 0, 0.0
        t0 = time.perf_counter()
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        t1 = time.perf_counter()
        (loss / world).backward()  # (FSDP2 averages again: only the times are used here)
        t2 = time.perf_counter()
        if world > 1 and not fsdp:
            sync_grads(model)  # replicated gradients summed over the ranks (experts are already whole)
        t3 = time.perf_counter()
        rows.append({"forward": t1 - t0, "backward": t2 - t1, "sync": t3 - t2, "a2a_fwd": Timed.seconds,
                     "sent": Timed.sent, "held": held})
        model.zero_grad(set_to_none=True)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(rows[1:], f)
    if world > 1:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fsdp", action="store_true", help="also FSDP2 for the dense weights at each world above 1")
    args = p.parse_args()
    print(f"k2-mini shape, {CFG.n_routed_experts} experts top-{CFG.num_experts_per_tok}, global batch "
          f"{args.batch}×{args.seq}, fp32, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print("| processes (EP) | dense weights | weights held / rank MB | step s | forward s | of which all-to-all s | "
          "backward s | gradient sync s | all-to-all MB sent / rank / step (fwd + bwd) | tokens/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for world, fsdp in [(w, f) for w in args.worlds for f in (False, True) if not f or (args.fsdp and w > 1)]:
        with tempfile.TemporaryDirectory() as out:
            if world == 1:
                _run(0, 1, args, out)
            else:
                mp.spawn(_run, args=(world, args, out, fsdp), nprocs=world)
            ranks = [json.load(open(f"{out}/rank{r}.json")) for r in range(world)]
        med = {k: statistics.median(max(rank[i][k] for rank in ranks) for i in range(args.reps))
               for k in ("forward", "backward", "sync", "a2a_fwd")}
        sent = statistics.median(statistics.mean(rank[i]["sent"] for rank in ranks) for i in range(args.reps))
        step = med["forward"] + med["backward"] + med["sync"]
        dense = "FSDP2" if fsdp else "replicated" if world > 1 else "–"
        print(f"| {world} | {dense} | {ranks[0][0]['held'] / 1e6:.1f} | {step:.2f} | {med['forward']:.2f} | "
              f"{med['a2a_fwd']:.3f} | {med['backward']:.2f} | "
              f"{med['sync']:.3f} | "
              f"{2 * sent / 1e6:.1f} | {args.batch * args.seq / step:.0f} |")


if __name__ == "__main__":
    main()
