"""openk2 vs transformers' DeepseekV3ForCausalLM on the same random weights, on CPU.

Cases, each in fp32 and bf16: (a) one MoE layer on 2,048 tokens, (b) prefill of 4×512 tokens
(full forward, all logits, no cache), (c) greedy decode at batch 1 (32-token prompt, 64 new tokens;
tok/s over the 63 steps after the first token, prefill excluded, timed per token on both sides).
Transformers runs with its defaults (attention and experts implementation are printed).

    .venv/bin/python bench/forward.py [--preset k2-small] [--threads 2] [--quick] [--profile]
"""

import argparse
import platform
import statistics
import subprocess
import tempfile
import time

import torch
import transformers
from transformers import DeepseekV3ForCausalLM
from transformers.generation.streamers import BaseStreamer

from openk2.checkpoint.hf import save_hf
from openk2.config import PRESETS
from openk2.engine.decode import decode_kernels
from openk2.engine.generate import generate_stream
from openk2.engine.sampler import SamplingParams
from openk2.model import build_model

PROMPT, NEW = 32, 64


def time_pair(ours_fn, theirs_fn, warmup: int, reps: int) -> tuple[float, float]:
    """Median seconds of each; the two alternate, so a noisy neighbour slows both alike."""
    for _ in range(warmup):
        ours_fn(), theirs_fn()
    times = ([], [])
    for _ in range(reps):
        for fn, ts in zip((ours_fn, theirs_fn), times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_moe(ours, theirs, cfg, dtype, reps):
    """Tokens/s through layer 1's MoE (router, routed experts, shared expert) on [1, 2048, D]."""
    x = torch.randn(1, 2048, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours_s, theirs_s = time_pair(lambda: ours.layers[1].mlp(x), lambda: theirs.model.layers[1].mlp(x),
                                 1, reps)
    return 2048 / ours_s, 2048 / theirs_s


def bench_moe_eager(ours, theirs, cfg, dtype, reps):
    """The same against transformers' per-expert loop (`experts_implementation="eager"`, 4.x's only one)."""
    default = theirs.config._experts_implementation
    theirs.set_experts_implementation("eager")
    try:
        return bench_moe(ours, theirs, cfg, dtype, reps)
    finally:
        theirs.set_experts_implementation(default)


def bench_prefill(ours, theirs, cfg, reps):
    ids = torch.randint(0, cfg.vocab_size // 2, (4, 512), generator=torch.Generator().manual_seed(2))
    ours_s, theirs_s = time_pair(lambda: ours(ids), lambda: theirs(ids, use_cache=False), 1, reps)
    return ids.numel() / ours_s, ids.numel() / theirs_s


class _Stamps(BaseStreamer):
    """Times each `put`: the first is the prompt, then one per generated token."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def decode_ours(model, ids, compile: bool = False):
    stamps, toks = [], []
    for tok in generate_stream(model, ids, SamplingParams(max_tokens=NEW), compile=compile):
        stamps.append(time.perf_counter())
        toks.append(tok)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), torch.stack(toks, 1)


def decode_theirs(model, ids):
    # eos None: nothing can stop it early (min_new_tokens would also *mask* eos and change the argmax)
    s = _Stamps()
    out = model.generate(ids, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                         streamer=s)
    assert out.shape[1] == PROMPT + NEW and len(s.t) == NEW + 1, "transformers stopped early"
    return (len(s.t) - 2) / (s.t[-1] - s.t[1]), out[:, PROMPT:]


def bench_decode(ours, theirs, cfg, reps):
    ids = torch.randint(0, cfg.vocab_size // 2, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    decode_ours(ours, ids), decode_theirs(theirs, ids)  # warm-up
    runs = [(decode_ours(ours, ids), decode_theirs(theirs, ids)) for _ in range(reps)]
    same = (runs[0][0][1] == runs[0][1][1]).sum().item()
    return (statistics.median(r[0][0] for r in runs), statistics.median(r[1][0] for r in runs),
            f"{same}/{NEW} greedy tokens agree")


def load_pair(cfg, dtype, folder):
    ours = build_model(cfg, dtype=dtype, seed=0).eval()
    save_hf(ours, folder, progress=False)
    # the small presets are model_type deepseek_v3, which transformers loads natively (for kimi_k2 it
    # has no expert-key conversion and would leave the experts random: the assert below catches it)
    theirs, info = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.eval()
    ids = torch.randint(0, cfg.vocab_size // 2, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = ours(ids).float()
    diff = (ref - theirs(ids, use_cache=False).logits.float()).abs().max().item()
    impl = f"attn={theirs.config._attn_implementation}, experts={theirs.config._experts_implementation}"
    print(f"{str(dtype):>14}: max |logits ours - transformers| = {diff:.2e} (max |logit| "
          f"{ref.abs().max():.2f}); transformers runs {impl}")
    return ours, theirs


def profile_decode_step(model, cfg):
    """Top ops of one absorbed-cache decode step of ours at position PROMPT."""
    cache = model.new_cache(1, PROMPT + 1)
    model(torch.randint(0, 1000, (1, PROMPT)), 0, cache)
    tok = torch.tensor([[5]])
    with decode_kernels(model, 1):  # as the Engine runs an eager decode step
        model(tok, PROMPT, cache)  # warm-up (overwrites the same slot)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(tok, PROMPT, cache)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def machine_line(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True)  # noqa: E731
    sha = git("rev-parse", "--short", "HEAD").stdout.strip()
    dirty = git("diff", "--quiet", "HEAD").returncode != 0  # tracked files only
    load = open("/proc/loadavg").read().split()[0]  # other jobs on the box show up here
    return (f"openk2 {sha}{'+dirty' if dirty else ''} | torch {torch.__version__} | transformers "
            f"{transformers.__version__} | {threads} threads | {cpu} | load {load}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 timed repeat, not 5 (MoE layer: 3, not 7)")
    ap.add_argument("--profile", action="store_true", help="top ops of one decode step of ours, per dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg, reps = PRESETS[args.preset], 1 if args.quick else 5
    print(f"{machine_line(args.threads)} | preset {args.preset} | median of {reps} (MoE {reps + 2})")
    rows, notes = [], []
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            ours, theirs = load_pair(cfg, dtype, f"{tmp}/{dtype}")
            name = str(dtype).removeprefix("torch.")
            rows.append(("MoE layer, 2048 tok (tok/s)", name, *bench_moe(ours, theirs, cfg, dtype, reps + 2)))
            rows.append(("MoE layer vs transformers' eager experts", name,
                         *bench_moe_eager(ours, theirs, cfg, dtype, reps)))
            rows.append(("prefill 4×512 (tok/s)", name, *bench_prefill(ours, theirs, cfg, reps)))
            *speeds, note = bench_decode(ours, theirs, cfg, reps)
            rows.append((f"decode b=1, {PROMPT}+{NEW} (tok/s)", name, *speeds))
            notes.append(f"decode {name}: {note}")
            if args.profile:
                profile_decode_step(ours, cfg)
            del ours, theirs
    print(f"\n{machine_line(args.threads)} | preset {args.preset} | median of {reps} (MoE {reps + 2})\n")
    print("| case | dtype | ours | transformers | ratio (ours/theirs) |\n| --- | --- | ---: | ---: | ---: |")
    for case, name, a, b in rows:
        print(f"| {case} | {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}× |")
    print("\n" + "; ".join(notes))


if __name__ == "__main__":
    main()
