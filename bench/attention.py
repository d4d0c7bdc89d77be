"""Training's attention over packed causal runs: openk2's kernel (`openk2::runs_attention`, AMX tiles) vs
torch's fused attention run by run, forward + backward, with QK-Clip's max logit as training records it.

Both sides do a training step's attention work: the forward with the max logit per head (openk2's
forward keeps it; torch's fused kernel hides its scores, so training scores them once more, `causal_max`)
and the backward. bf16, each side in turns, round by round (a noisy neighbour slows both alike); medians.

    .venv/bin/python -m bench.attention [--reps 7] [--threads 2]
"""

import argparse
import statistics
import time

import torch

from bench.forward import machine_line
from openk2 import kernels
from openk2.config import PRESETS
from openk2.model import flash


def flops(H: int, A: int, O: int, runs) -> float:
    """Forward + backward FLOPs of causal attention (half of each run's scores): forward q·kᵀ and p·v,
    backward the scores again, dP, dq, dk and dv."""
    pairs = sum(n * (n + 1) / 2 for n in runs)
    return 2 * H * pairs * ((A + O) + (A + O + A + A + O))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (kernels.load() and flash.RUNS_KERNEL):
        raise SystemExit("openk2's training attention needs its CPU kernels built and AMX tiles (this CPU has none)")
    kernel = flash.RUNS_KERNEL
    print(f"\n{machine_line(args.threads)} | bf16 | 2,048 positions a call | median of {args.reps}, in turns\n")
    print("| shape | runs | torch fused, run by run (ms) | openk2 (ms) | speed-up | openk2 GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name in ("k2-mini", "k2-small"):
        cfg = PRESETS[name]
        H, A, O = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
        for n in (256, 512, 1024, 2048):
            runs = (n,) * (2048 // n)
            g = torch.Generator().manual_seed(n)
            q, k = (torch.randn(1, H, 2048, A, generator=g).bfloat16().requires_grad_() for _ in range(2))
            v = torch.randn(1, H, 2048, O, generator=g).bfloat16().requires_grad_()
            dout = torch.randn(1, H, 2048, O, generator=g).bfloat16()
            times = {True: [], False: []}
            for _ in range(args.reps):
                for ours in (False, True):
                    flash.RUNS_KERNEL = kernel if ours else None
                    t0 = time.perf_counter()
                    out, _ = flash.by_runs(q, k, v, runs, A ** -0.5, record=True)
                    out.backward(dout)
                    times[ours].append(time.perf_counter() - t0)
            flash.RUNS_KERNEL = kernel
            theirs, ours = (statistics.median(times[o]) for o in (False, True))
            print(f"| {name} ({H} heads, {A}/{O}) | {len(runs)} × {n} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | "
                  f"{theirs / ours:.2f}× | {flops(H, A, O, runs) / ours / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
