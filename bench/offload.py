"""A K2-shaped model bigger than this machine's memory, decoded through the expert cache (openk2.offload).

The model (`demo_config`): K2's shape scaled to hidden 2048 — MLA with a q latent, the first layer
dense, 384 fine-grained routed experts top-8 + 1 shared, K2's 163,840-token vocabulary — with 16
layers, so that its bf16 weights (random, N(0, 0.02)) take ~41 GB on disk, at least 1.5× the RAM.

    .venv/bin/python bench/offload.py write DIR          # once: ~41 GB, shard by shard (a few minutes)
    .venv/bin/python bench/offload.py decode DIR [--cache-gb 1 2 4 8] [--policy lru lfu] [--prefetch on off]
                                                 [--tokens 32] [--cold] [--format float int4]
                                                 [--plot experiments/results/offload.png]
    .venv/bin/python bench/offload.py reference DIR      # greedy tokens vs a layer-by-layer reference

`decode` runs each (cache size, policy, format) in a fresh process (peak RSS is that process's ru_maxrss),
batch 1, greedy, an 8-token prompt, and prints tok/s over the steps after the first, the hit rate,
bytes read from the files, the seconds decoding stalled on reads and the peak RSS, beside the
machine's RAM and a disk read rate measured in the same run. Reads go through the OS page cache
(what the RAM not held by the process keeps of the files): with `--cold` (root) it is dropped
before each run. The tokens of the first run are saved, and `reference` checks them: one forward of
prompt + tokens, layer by layer, each MoE layer with all 384 experts read into memory for that layer
only; its greedy choice at every position must be the token decoded.
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from openk2.checkpoint.hf import _hf_entries
from openk2.config import KIMI_K2, ModelConfig
from openk2.info import available_bytes, breakdown
from openk2.model.moe import Experts, MoE
from openk2.model.rope import rope_cos_sin
from openk2.model.transformer import Transformer, cast

PROMPT = [1000 + 7919 * i % 150000 for i in range(8)]


def demo_config() -> ModelConfig:
    return dataclasses.replace(
        KIMI_K2, hidden_size=2048, intermediate_size=5120, num_hidden_layers=16, num_attention_heads=16,
        q_lora_rank=512, kv_lora_rank=256, moe_intermediate_size=576, max_position_embeddings=4096,
        rope_scaling={**KIMI_K2.rope_scaling, "factor": 1.0, "original_max_position_embeddings": 4096},
        torch_dtype="bfloat16", model_type="deepseek_v3")


def write(folder: Path, seed: int = 0) -> None:
    """The random model as a HF folder: the resident weights in one shard, each layer's experts in
    another, never more than one layer's experts in memory."""
    cfg = demo_config()
    folder.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf_dict()
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    with torch.device("meta"):
        model = Transformer(cfg)
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp.experts = nn.Module()  # the routed experts are written below, layer by layer
    model = cast(model.to_empty(device="cpu"), torch.bfloat16).init_weights(seed)
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    n = 1 + len(moe)
    weight_map, total, t0 = {}, 0, time.perf_counter()

    def put(k: int, tensors: dict) -> None:
        nonlocal total
        file = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        print(f"  {file}: {sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s",
              flush=True)

    put(1, {name: t.contiguous() for name, t in _hf_entries(model)})
    gen = torch.Generator().manual_seed(seed + 1)
    D, F_, std = cfg.hidden_size, cfg.moe_intermediate_size, cfg.initializer_range
    for k, i in enumerate(moe, start=2):
        tensors = {}
        for e in range(cfg.n_routed_experts):
            for proj, shape in (("gate_proj", (F_, D)), ("up_proj", (F_, D)), ("down_proj", (D, F_))):
                w = torch.empty(shape, dtype=torch.bfloat16)
                tensors[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = w.normal_(0.0, std, generator=gen)
        put(k, tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"{folder}: {total / 1e9:.1f} GB ({breakdown(cfg).total / 1e9:.2f} B parameters), "
          f"RAM {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1e9:.1f} GB")


def _decode_one(folder: str, cache_gb: float, policy: str, tokens: int, threads: int, prefetch: bool = True,
                dtype: torch.dtype | None = None, fmt: str = "float") -> dict:
    """One run, in this process: load, decode greedily, report. fmt int4: `quantize_model(model, "int4")`,
    so the cache holds int4 codes and scales."""
    from openk2.engine.generate import generate_stream
    from openk2.engine.sampler import SamplingParams
    from openk2.offload import load_offloaded
    from openk2.quant import quantize_model

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_offloaded(folder, int(cache_gb * 1e9), dtype, policy=policy, progress=False, prefetch=prefetch).eval()
    if fmt == "int4":
        quantize_model(model, "int4")
    load_s, cache = time.perf_counter() - t0, model.expert_cache
    stamps, out = [time.perf_counter()], []
    for tok in generate_stream(model, torch.tensor([PROMPT]), SamplingParams(max_tokens=tokens)):
        out.append(int(tok[0]))
        stamps.append(time.perf_counter())
        if len(out) == 1:
            first = cache.stats()
    s = cache.stats()
    d = {k: s[k] - first[k] for k in ("hits", "misses", "prefetch_used", "bytes_read", "stall_s")}  # after token 1
    steps = len(out) - 1
    return {"cache_gb": cache_gb, "policy": policy, "prefetch": prefetch, "slots": s["slots"], "load_s": load_s,
            "format": fmt,
            "prefetch_used": d["prefetch_used"] / max(1, d["misses"] + d["prefetch_used"]),
            "first_token_s": stamps[1] - stamps[0], "tok_s": steps / (stamps[-1] - stamps[1]),
            "hit_rate": d["hits"] / max(1, d["hits"] + d["misses"] + d["prefetch_used"]),
            "read_gb_per_token": d["bytes_read"] / steps / 1e9, "stall_share": d["stall_s"] / (stamps[-1] - stamps[1]),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "tokens": out}


def disk_rate(folder: Path, nbytes: int = 2 * 10**9) -> float:
    """GB/s of one sequential read of the last shard (through the page cache, as decoding reads)."""
    path = sorted(folder.glob("*.safetensors"))[-1]
    buf, done, t0 = bytearray(64 << 20), 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < nbytes and (got := f.readinto(buf)):
            done += got
    return done / (time.perf_counter() - t0) / 1e9


def decode(folder: Path, caches: list[float], policies: list[str], tokens: int, threads: int, cold: bool,
           prefetch: list[str], plot: Path | None = None, formats: tuple[str, ...] = ("float",)):
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    print(f"model {disk:.1f} GB on disk, RAM {ram:.1f} GB ({disk / ram:.2f}x), available "
          f"{available_bytes() / 1e9:.1f} GB, {threads} threads, load {os.getloadavg()[0]:.2f}")
    rows = []
    for gb, policy, pre, fmt in ((gb, policy, pre, fmt) for gb in caches for policy in policies for pre in prefetch
                                 for fmt in formats):
        if cold:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        cmd = [sys.executable, __file__, "_one", str(folder), str(gb), policy, str(tokens), str(threads), pre, fmt]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        r = rows[-1]
        print(f"  cache {gb:5.1f} GB {fmt} {policy} prefetch {pre}: {r['tok_s']:.2f} tok/s, "
              f"hits {100 * r['hit_rate']:.0f} %, "
              f"peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
    print(f"disk read rate now (page cache included): {disk_rate(folder):.2f} GB/s")
    head = ("cache GB", "format", "slots", "policy", "prefetch", "tok/s", "hit %", "misses prefetched %", "GB read/tok",
            "stall %", "1st tok s", "peak RSS GB")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['cache_gb']:g} | {r['format']} | {r['slots']} | {r['policy']} | "
              f"{'on' if r['prefetch'] else 'off'} | "
              f"{r['tok_s']:.2f} | {100 * r['hit_rate']:.0f} | {100 * r['prefetch_used']:.0f} | "
              f"{r['read_gb_per_token']:.2f} | {100 * r['stall_share']:.0f} | {r['first_token_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} |")
    for fmt in formats:
        mine = [r["tokens"] for r in rows if r["format"] == fmt]
        same = all(t == mine[0] for t in mine)
        print(f"greedy tokens identical across the {fmt} cache's runs: {same}")
    if plot:
        draw(rows, plot, f"{disk:.1f} GB model ({disk / ram:.2f}x RAM), batch 1, {threads} threads")


def draw(rows: list[dict], path: Path, title: str) -> None:
    """tok/s and hit rate against the cache size, one line per (policy, prefetch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, hits) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in sorted({(r["policy"], r["prefetch"], r["format"]) for r in rows}):
        mine = [r for r in rows if (r["policy"], r["prefetch"], r["format"]) == key]
        label = f"{key[2]}, {key[0]}, prefetch {'on' if key[1] else 'off'}"
        speed.plot([r["cache_gb"] for r in mine], [r["tok_s"] for r in mine], "o-", label=label)
        hits.plot([r["cache_gb"] for r in mine], [100 * r["hit_rate"] for r in mine], "o-", label=label)
    for ax, name in ((speed, "decode tok/s"), (hits, "expert cache hits %")):
        ax.set_xlabel("expert cache GB")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    speed.set_ylim(bottom=0)
    hits.set_ylim(0, 100)
    speed.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


@torch.inference_mode()
def reference(folder: Path, threads: int) -> None:
    """A cached greedy decode in fp32, then a teacher-forced forward of prompt + its tokens, one layer at a
    time with all of that layer's experts in memory: the greedy choices must agree. (In fp32: a random
    model's bf16 logits tie often, and ties break by rounding differences between the two paths.)"""
    from openk2.offload import load_offloaded

    done = _decode_one(str(folder), 4.0, "lru", 16, threads, dtype=torch.float32)
    print(f"cached decode (fp32, 4 GB cache): {done['tok_s']:.2f} tok/s, hits {100 * done['hit_rate']:.0f} %")
    ids = torch.tensor([PROMPT + done["tokens"]])
    model = load_offloaded(folder, 0.3e9, torch.float32, progress=False, prefetch=False).eval()
    store, cfg = model.expert_cache.store, model.cfg
    x = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(ids.shape[1]), model.rope_mult, x.dtype)
    t0 = time.perf_counter()
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoE):
            offloaded, full = layer.mlp.experts, Experts(cfg)
            for e in range(cfg.n_routed_experts):
                store.read_into(i, e, full.gate_up_proj.data[e], full.down_proj.data[e])
            layer.mlp.experts = full
        x = layer(x, cos, sin)
        if isinstance(layer.mlp, MoE):
            layer.mlp.experts = offloaded
            del full
        print(f"  layer {i}: {time.perf_counter() - t0:.0f} s, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB", flush=True)
    logits = model.lm_head(model.model.norm(x))[0].float()
    P = len(PROMPT)
    greedy = logits[P - 1:-1].argmax(-1).tolist()
    top2 = logits[P - 1:-1].topk(2, -1).values
    agree = sum(a == b for a, b in zip(greedy, done["tokens"]))
    print(f"reference (layer by layer, all experts of a layer read at once): {agree}/{len(greedy)} greedy tokens "
          f"equal the cached decode's; smallest top-1 margin {float((top2[:, 0] - top2[:, 1]).min()):.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["write", "decode", "reference", "_one"])
    p.add_argument("folder", type=Path)
    p.add_argument("rest", nargs="*")
    p.add_argument("--cache-gb", type=float, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--policy", nargs="+", default=["lru"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    p.add_argument("--prefetch", nargs="+", default=["off"], choices=["on", "off"])
    p.add_argument("--format", nargs="+", default=["float"], choices=["float", "int4"],
                   help="what the cache holds: the checkpoint's weights, or int4 (quantize_model(model, 'int4'))")
    p.add_argument("--plot", type=Path, help="save tok/s and hit rate against the cache size here (PNG)")
    a = p.parse_args()
    if a.mode == "write":
        write(a.folder)
    elif a.mode == "decode":
        decode(a.folder, a.cache_gb, a.policy, a.tokens, a.threads, a.cold, a.prefetch, a.plot, tuple(a.format))
    elif a.mode == "reference":
        reference(a.folder, a.threads)
    else:
        gb, policy, tokens, threads, pre, fmt = a.rest
        print(json.dumps(_decode_one(str(a.folder), float(gb), policy, int(tokens), int(threads), pre == "on",
                                     fmt=fmt)))


if __name__ == "__main__":
    main()
