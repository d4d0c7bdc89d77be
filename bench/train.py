"""Training step: openk2 (AdamW, MuonClip) vs transformers' DeepseekV3ForCausalLM + AdamW, same weights.

One step = forward under bf16 autocast (fp32 master weights), cross entropy (openk2: `openk2 train`'s
fused `target_loss`; transformers: `lm_loss` of its logits, as its own loss computes it), backward, gradient
clipping, optimiser step (MuonClip: Muon + QK-Clip from the recorded max logits, as `openk2 train`
does). The three run interleaved, round by round, so a noisy neighbour slows all alike, each in a process
of its own: a step's fresh memory is faulted in or reused depending on what else its process allocated
(in one process, openk2 keeping its buffers made transformers' step 3.5 -> 5.0 s). MFU is taken
against the bf16 matmul peak measured in the same run (`torch.mm`, 2048³).

    .venv/bin/python -m bench.train [--preset k2-small] [--batch 8] [--seq 256] [--reps 3] [--profile]
"""

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import transformers
from transformers import DeepseekV3ForCausalLM

from bench.forward import machine_line
from openk2 import kernels
from openk2.checkpoint.hf import save_hf
from openk2.config import PRESETS
from openk2.info import train_flops_per_token
from openk2.model import build_model, lm_loss
from openk2.optim import apply_qk_clip, muon_param_groups
from openk2.train.config import TrainConfig
from openk2.train.loop import build_optimizer, target_loss


def bf16_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` bf16 n×n×n matmuls."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class Case:
    """A model, its optimiser and one training step on a fixed batch; times the step and its optimiser."""

    def __init__(self, name, model, opt, loss, clip=False):
        self.name, self.model, self.opt, self.loss, self.clip = name, model, opt, loss, clip
        self.steps, self.opt_shares = [], []

    def step(self, x, y):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        t_opt = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.clip:
            apply_qk_clip(self.model, self.model.max_logits())
        t1 = time.perf_counter()
        return t1 - t0, (t1 - t_opt) / (t1 - t0)


def ns_flops(model, steps: int = 5) -> int:
    """FLOPs of one Muon step's Newton–Schulz: per A×B matrix (A ≤ B) and iteration, X·Xᵀ and (XXᵀ)·X
    (2·A²·B each) and (XXᵀ)² (2·A³). It does not shrink with the batch: at small batches it is the step."""
    total = 0
    for g in muon_param_groups(model):
        if g["algo"] != "muon":
            continue
        for p in g["params"]:
            A, B = sorted(g["matrix"] or p.shape)
            total += p.numel() // (A * B) * steps * (4 * A * A * B + 2 * A ** 3)
    return total


NAMES = ("transformers + AdamW", "openk2 + AdamW", "openk2 + MuonClip")


def build_case(name: str, cfg, folder, lr: float) -> Case:
    """The case `name` on the weights of `folder` (openk2's seed-0 model, saved as an HF folder)."""
    if name == NAMES[0]:
        theirs, info = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        theirs.train()
        impl = f"attn={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"
        return Case(name, theirs, torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=0.1),
                    lambda x, y: lm_loss(theirs(x, use_cache=False).logits, y)), impl
    kernels.load_for("cpu")  # as `openk2 train` does: the CPU's kernels (training's attention among them)
    ours = build_model(cfg, seed=0).train()
    muon = name == NAMES[2]
    ours.record_max_logits(muon)
    opt = build_optimizer(TrainConfig(optimizer="muonclip" if muon else "adamw", lr=lr), ours)
    return Case(name, ours, opt, lambda x, y: target_loss(ours, x, y, []), clip=muon), None


def serve_case(conn, name: str, args, folder: str):
    """One case in a process of its own (its own allocator: a step's fresh memory is faulted in or
    reused depending on what else the process did), stepping when the parent says so."""
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = PRESETS[args.preset]
    case, impl = build_case(name, cfg, folder, args.lr)
    x, y = batch(cfg, args.batch, args.seq)
    case.step(x, y)  # warm-up: first-touch allocations, optimiser state
    conn.send(impl)
    while (msg := conn.recv()) != "stop":
        if msg == "profile":
            profile_step(case, x, y)
        conn.send(case.step(x, y) if msg == "step" else None)


def batch(cfg, batch_size: int, seq: int):
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


def profile_step(case: Case, x, y, rows: int = 15):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        case.step(x, y)
    print(f"\ntop ops of one step, {case.name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (each runs every case once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--profile", action="store_true", help="top ops of one step of each openk2 case")
    ap.add_argument("--keep-freed", action="store_true",
                    help="every case's process keeps the memory it frees (glibc: no mmap, no trim), so no step "
                         "faults in fresh pages: a comparison of the steps' work without the page faults")
    args = ap.parse_args()
    if args.keep_freed:  # read by glibc when each case's process starts
        os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40), MALLOC_TOP_PAD_=str(1 << 28))
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    peak = bf16_peak()
    model = build_model(cfg, seed=0)
    ns = ns_flops(model)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp, progress=False)
        del model
        pipes, procs, impl = [], [], ""
        for name in NAMES:  # one at a time: each loads and warms up alone
            parent, child = ctx.Pipe()
            procs.append(ctx.Process(target=serve_case, args=(child, name, args, tmp)))
            procs[-1].start()
            child.close()  # the child's end lives in the child: its exit ends our recv() with EOFError
            pipes.append(parent)
            impl = parent.recv() or impl  # ready; transformers' attention and experts implementation
    steps = {name: [] for name in NAMES}
    for _ in range(args.reps):  # interleaved round by round: a noisy neighbour slows all alike
        for name, pipe in zip(NAMES, pipes):
            pipe.send("step")
            steps[name].append(pipe.recv())
    x, _ = batch(cfg, args.batch, args.seq)
    tokens, flops = x.numel(), train_flops_per_token(cfg, args.seq) * x.numel()
    head = (f"{machine_line(args.threads)} | preset {args.preset} | batch {args.batch}×{args.seq}, bf16 autocast | "
            f"median of {args.reps}, a process per case{', freed memory kept' if args.keep_freed else ''} | "
            f"bf16 peak {peak / 1e12:.2f} TFLOP/s | transformers {impl}")
    base = tokens / statistics.median(dt for dt, _ in steps[NAMES[0]])
    print(f"\n{head}\n")
    print("| step | tok/s | vs transformers + AdamW | MFU | optimiser share |\n|---|---:|---:|---:|---:|")
    for name in NAMES:
        s = statistics.median(dt for dt, _ in steps[name])
        print(f"| {name} | {tokens / s:,.0f} | {tokens / s / base:.2f}× | {flops / s / peak:.1%} | "
              f"{statistics.median(share for _, share in steps[name]):.0%} |")
    print(f"\nper step: forward+backward {flops / 1e9:,.0f} GFLOP, Muon's Newton–Schulz {ns / 1e9:,.0f} GFLOP "
          f"({ns / peak:.2f} s at the bf16 peak: {ns / (ns + flops):.0%} of the step's FLOPs at this batch)",
          flush=True)
    for name, pipe in zip(NAMES, pipes):
        if args.profile and name != NAMES[0]:
            pipe.send("profile")
            pipe.recv()
        pipe.send("stop")
    for proc in procs:
        proc.join()


if __name__ == "__main__":
    main()
