"""Weight-only int8 / int4 (openk2.quant) against the bf16 model, on CPU: logit error and decode speed.

Modes: bf16; int8 (every linear but lm_head / kv_b_proj / router); int4 (routed experts only, as
K2-Thinking); int4+lin (every linear in int4). Logit error against bf16 on a [B, S] batch: max |Δ|,
relative L2, top-1 agreement (fp32 vs bf16 printed first, for scale), and with --tokens the
next-token loss. Decode: batch 1, 32-token prompt, 64 greedy tokens, tok/s over the 63 steps after
the first (as bench/forward.py), the modes interleaved and the median of --reps taken.

    .venv/bin/python bench/quant.py [--preset k2-small] [--checkpoint DIR --tokens val.bin] [--threads 2]
"""

import argparse
import copy
import platform
import statistics
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F

from openk2.checkpoint import load_hf
from openk2.config import PRESETS
from openk2.engine.generate import generate_stream
from openk2.engine.sampler import SamplingParams
from openk2.model import build_model
from openk2.model.transformer import cast
from openk2.quant import quantize_model

PROMPT, NEW = 32, 64
MODES = {"bf16": None, "int8": ("int8", None), "int4": ("int4", None), "int4+lin": ("int4", True)}


def weight_bytes(model) -> int:
    """Bytes resident in parameters and buffers (the int4 kernel layout included)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def errors(logits, ref, targets=None):
    d = (logits.float() - ref.float())
    out = {"max|Δ|": d.abs().max().item(), "rel L2": (d.norm() / ref.float().norm()).item(),
           "top-1": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    if targets is not None:
        out["loss"] = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).item()
    return out


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def decode_tok_s(model, ids):
    stamps = []
    for _ in generate_stream(model, ids, SamplingParams(max_tokens=NEW)):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--checkpoint", help="a HF folder instead of the random preset")
    p.add_argument("--tokens", help="uint16 token file (openk2 data format) for the batch and the loss")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, commit {commit} (dirty tree)")
    if args.checkpoint:
        fp32 = load_hf(args.checkpoint, dtype=torch.float32, progress=False).eval()
    else:
        fp32 = build_model(PRESETS[args.preset], dtype=torch.float32, seed=0).eval()
    cfg = fp32.cfg
    gen = torch.Generator().manual_seed(0)
    if args.tokens:
        tokens = np.fromfile(args.tokens, dtype=np.uint16)
        start = torch.randint(0, len(tokens) - args.seq - 1, (args.batch,), generator=gen)
        win = torch.stack([torch.from_numpy(tokens[s:s + args.seq + 1].astype(np.int64)) for s in start.tolist()])
        ids, targets = win[:, :-1], win[:, 1:]
    else:
        ids, targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen), None
    bf16 = cast(copy.deepcopy(fp32), torch.bfloat16)
    models = {name: bf16 if q is None else quantize_model(copy.deepcopy(bf16), *q) for name, q in MODES.items()}
    with torch.inference_mode():
        ref = bf16(ids)
        rows = {"fp32": errors(fp32(ids), ref, targets)}
        for name, model in models.items():
            rows[name] = errors(model(ids), ref, targets)
        for name, model in models.items():  # prefill: the whole batch, no cache, median of 3
            rows[name]["prefill tok/s"] = ids.numel() / statistics.median(timed(model, ids) for _ in range(3))
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=gen)
    for model in models.values():
        decode_tok_s(model, prompt)  # warm-up
    speeds = {name: [] for name in models}
    for _ in range(args.reps):  # interleaved: a noisy neighbour slows every mode alike
        for name, model in models.items():
            speeds[name].append(decode_tok_s(model, prompt))
    what = args.checkpoint or f"{args.preset} (random init)"
    print(f"# {what}: logits on [{args.batch}, {args.seq}] "
          f"{'val tokens' if args.tokens else 'random ids'} vs bf16; decode batch 1, median of {args.reps}")
    cols = ["max|Δ|", "rel L2", "top-1"] + (["loss"] if targets is not None else [])
    print(f"| mode | {' | '.join(cols)} | prefill tok/s | decode tok/s | × bf16 | weights MiB |")
    print("|" + "---|" * (len(cols) + 5))
    base = statistics.median(speeds["bf16"])
    for name, r in rows.items():
        tok_s = statistics.median(speeds[name]) if name in speeds else None
        cells = [f"{r[c]:.4g}" if c != "top-1" else f"{r[c]:.1%}" for c in cols]
        prefill = f"{r['prefill tok/s']:.0f}" if "prefill tok/s" in r else "–"
        speed = f"{tok_s:.1f} | {tok_s / base:.2f}" if tok_s else "– | –"
        mib = weight_bytes(models.get(name, fp32)) / 2**20
        print(f"| {name} | {' | '.join(cells)} | {prefill} | {speed} | {mib:.0f} |")


if __name__ == "__main__":
    main()
