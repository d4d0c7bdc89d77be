"""Training step: openk2 (AdamW, MuonClip) vs transformers' DeepseekV3ForCausalLM + AdamW, same weights.

One step = forward under bf16 autocast (fp32 master weights), cross entropy, backward, gradient
clipping, optimiser step (MuonClip: Muon + QK-Clip from the recorded max logits, as `openk2 train`
does). The three run interleaved, round by round, so a noisy neighbour slows all alike. MFU is taken
against the bf16 matmul peak measured in the same run (`torch.mm`, 2048³).

    .venv/bin/python -m bench.train [--preset k2-small] [--batch 8] [--seq 256] [--reps 3] [--profile]
"""

import argparse
import statistics
import tempfile
import time

import torch
import transformers
from transformers import DeepseekV3ForCausalLM

from bench.forward import machine_line
from openk2.checkpoint.hf import save_hf
from openk2.config import PRESETS
from openk2.info import train_flops_per_token
from openk2.model import build_model, lm_loss
from openk2.optim import apply_qk_clip, muon_param_groups
from openk2.train.config import TrainConfig
from openk2.train.loop import build_optimizer


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

    def __init__(self, name, model, opt, forward, clip=False):
        self.name, self.model, self.opt, self.forward, self.clip = name, model, opt, forward, clip
        self.steps, self.opt_shares = [], []

    def step(self, x, y):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(self.forward(x), y)
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


def build_cases(cfg, folder, lr: float):
    ours_adamw = build_model(cfg, seed=0).train()
    save_hf(ours_adamw, folder, progress=False)
    theirs, info = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.train()
    ours_muon = build_model(cfg, seed=0).train()
    ours_muon.record_max_logits(True)
    impl = f"attn={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"
    return impl, [
        Case("transformers + AdamW", theirs, torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=0.1),
             lambda x: theirs(x, use_cache=False).logits),
        Case("openk2 + AdamW", ours_adamw, build_optimizer(TrainConfig(optimizer="adamw", lr=lr), ours_adamw),
             ours_adamw),
        Case("openk2 + MuonClip", ours_muon, build_optimizer(TrainConfig(optimizer="muonclip", lr=lr), ours_muon),
             ours_muon, clip=True),
    ]


def profile_step(case: Case, x, y, rows: int = 15):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        case.step(x, y)
    print(f"\ntop ops of one step, {case.name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (each runs every case once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--profile", action="store_true", help="top ops of one step of each openk2 case")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = PRESETS[args.preset]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    peak = bf16_peak()
    with tempfile.TemporaryDirectory() as tmp:
        impl, cases = build_cases(cfg, tmp, args.lr)
    for case in cases:  # warm-up: first-touch allocations, optimiser state
        case.step(x, y)
    for _ in range(args.reps):
        for case in cases:
            dt, share = case.step(x, y)
            case.steps.append(dt)
            case.opt_shares.append(share)
    tokens, flops = x.numel(), train_flops_per_token(cfg, args.seq) * x.numel()
    head = (f"{machine_line(args.threads)} | preset {args.preset} | batch {args.batch}×{args.seq}, bf16 autocast | "
            f"median of {args.reps} | bf16 peak {peak / 1e12:.2f} TFLOP/s | transformers {impl}")
    base = tokens / statistics.median(cases[0].steps)
    print(f"\n{head}\n")
    print("| step | tok/s | vs transformers + AdamW | MFU | optimiser share |\n|---|---:|---:|---:|---:|")
    for case in cases:
        s = statistics.median(case.steps)
        print(f"| {case.name} | {tokens / s:,.0f} | {tokens / s / base:.2f}× | {flops / s / peak:.1%} | "
              f"{statistics.median(case.opt_shares):.0%} |")
    ns = ns_flops(cases[2].model)
    print(f"\nper step: forward+backward {flops / 1e9:,.0f} GFLOP, Muon's Newton–Schulz {ns / 1e9:,.0f} GFLOP "
          f"({ns / peak:.2f} s at the bf16 peak: {ns / (ns + flops):.0%} of the step's FLOPs at this batch)")
    if args.profile:
        for case in cases[1:]:
            profile_step(case, x, y)


if __name__ == "__main__":
    main()
