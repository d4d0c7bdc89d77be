"""Muon's step at one process: one-matrix parameters batched per shape (`optim.muon._batches`) vs each alone.

The same optimizer, state and gradients (random, fixed) step in turns, round by round, so a noisy
neighbour slows both alike; the table gives each version's median step (the whole `Muon.step`: the
AdamW groups too, the same in both) and the Newton–Schulz FLOPs of the matrices that the batching groups.

    .venv/bin/python -m bench.muon [--preset k2-small] [--reps 3] [--threads 2]
"""

import argparse
import statistics
import time

import torch

from bench.forward import machine_line
from openk2.config import PRESETS
from openk2.model import build_model
from openk2.optim import muon
from openk2.optim.groups import muon_param_groups


def ns_flops(A: int, B: int, steps: int = 5) -> int:
    """Newton–Schulz on one A×B matrix: X Xᵀ, (X Xᵀ)², and the product with X, per step."""
    a, b = sorted((A, B))
    return steps * (4 * a * a * b + 2 * a ** 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (each steps both versions once)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(PRESETS[args.preset])
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    groups = muon_param_groups(model)
    singles = [p for grp in groups if grp["algo"] == "muon" and grp["matrix"] is None for p in grp["params"]]
    opt = muon.Muon(groups, lr=1e-3)
    versions = {"each parameter alone": lambda items, A, B: [[item] for item in items], "batched": muon._batches}
    times = {name: [] for name in versions}
    for rep in range(args.reps + 1):  # the first round warms up (state, scratch)
        for name, batches in versions.items():
            muon._batches = batches
            start = time.perf_counter()
            opt.step()
            if rep:
                times[name].append(time.perf_counter() - start)
    muon._batches = versions["batched"]
    print(f"```\n{machine_line(args.threads)} | preset {args.preset} | median of {args.reps}\n```")
    print(f"{len(singles)} one-matrix parameters, {sum(ns_flops(*p.shape) for p in singles) / 1e9:.1f} GFLOP of "
          "Newton–Schulz a step\n")
    print("| optimizer step | s | vs alone |\n|---|---:|---:|")
    base = statistics.median(times["each parameter alone"])
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {base / statistics.median(ts):.2f}× |")


if __name__ == "__main__":
    main()
