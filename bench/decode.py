"""Decode throughput on CPU: batch-1 tokens/s of openk2 (bf16, int8, int4; eager and compiled) vs
llama.cpp (BF16, Q8_0, Q4_K_M) and transformers' generate on the same weights, vs the
memory-bandwidth roofline; and the Engine's aggregate tokens/s at batch 1, 8 and 32 (eager and
compiled decode steps); the prefill of one 512- or 4,000-token prompt, side by side, in bf16 and
(`qprefill`) quantized beside llama.cpp's Q8_0 and Q4_K_M; and a batch-32 decode step against its
floor (`batch_floor`: the weights it must read, once, at the measured bandwidth, and read right
after each step).

Side by side: the batch-1 rows run round-robin, one decode of each per round, medians of the rounds,
so load on the machine falls on all alike. llama.cpp runs through llama-cpp-python (the bench extra:
`pip install llama-cpp-python gguf`; without it its rows are left out) on GGUF files converted from
the same HF folder (bench/gguf.py: BF16, then llama.cpp's own quantizer for Q8_0 and Q4_K_M; Q4_K_M
quantizes attention too, openk2's int4 the routed experts only, K2-Thinking's recipe, and "int4
linears" every linear but lm_head and kv_b_proj, as Q4_K_M does).

Roofline: a batch-1 decode step must read every active weight once — the active linear weights of
`openk2.info` at the mode's bytes per weight (int4 and int8 apply to the quantized linears only, the
rest stays bf16) — so tokens/s ≤ measured bandwidth / active bytes. Bandwidth is measured here by
summing a 1 GiB tensor, fp32 and bf16, the faster (`bandwidth_gbs`). Aggregate: 32 requests (32-token
prompts, 64 new tokens) through an Engine with max_batch 1, 8 or 32, prefill included, bf16 (or each of
`--aggregate-formats`); each configuration runs once untimed first, so compilation is not counted (the
batch-1 rows print their first run's time, compilation included).

    .venv/bin/python -m bench.decode [--preset k2-small] [--threads 2] [--quick] [--only TABLE ...]
        [--aggregate-formats bf16 int8 int4]
"""

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
from functools import partial

import torch

from bench.forward import decode_ours, decode_theirs, load_pair, machine_line
from openk2.config import PRESETS
from openk2.engine import Engine, EngineConfig, SamplingParams
from openk2.info import breakdown
from openk2.model import linear
from openk2.quant import quantize_model

PROMPT, NEW = 32, 64
LLAMAS = []  # llama.cpp models, closed before exit (their finalizers fail at interpreter shutdown)


def bandwidth_gbs() -> float:
    """GB/s of the fastest plain read measured here: the best of 5 sums of a 1 GiB tensor, fp32 and bf16.
    A bf16 sum converts each element first and, on 2 cores, tops out below the memory (18 GB/s where an
    fp32 sum read 24-30 GB/s, a Xeon with AMX, 2026-12-06): a floor's time came out too long, a roofline
    too low, both too easy to meet. The fp32 sum reads without converting."""
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(2**30 // dtype.itemsize, dtype=dtype)
        x.sum()
        for _ in range(5):
            t0 = time.perf_counter()
            x.sum()
            best = max(best, 2**30 / (time.perf_counter() - t0) / 1e9)
        del x
    return best


def active_bytes(cfg, mode: str) -> float:
    """Weights one batch-1 token reads: routed-expert share at the mode's width, the rest bf16
    (int8 and "int4 linears" also narrow attention / dense / shared linears, counted here with
    kv_b_proj, which stays bf16: ~0.05% of the weights; lm_head stays bf16)."""
    b = breakdown(cfg)
    n_moe = cfg.n_moe_layers
    experts = n_moe * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    rest, head = b.active_linear - experts, cfg.vocab_size * cfg.hidden_size
    if mode == "int4":
        return experts * 0.5 + experts / 32 * 2 + rest * 2
    if mode == "int4 linears":
        return (b.active_linear - head) * (0.5 + 2 / 32) + head * 2
    if mode == "int8":
        return (b.active_linear - head) * 1 + head * 2
    return b.active_linear * 2


def decode_llama(llm, ids) -> float:
    """llama.cpp's greedy batch-1 decode through llama-cpp-python: tok/s over the NEW - 1 steps after
    the first token, prefill excluded, as `decode_ours` times it."""
    import numpy as np
    llm.reset()
    llm.eval(ids[0].tolist())
    stamps = []
    for _ in range(NEW):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))
        stamps.append(time.perf_counter())
        llm.eval([tok])
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def llama_cpp_rows(folder: str, ids, threads: int) -> dict:
    """{name: (precision it pairs with, timing fn)} for llama.cpp on GGUFs converted from `folder`
    (bench/gguf.py): BF16, Q8_0, Q4_K_M; empty without llama-cpp-python."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    from bench.gguf import quantize, write_gguf
    bf16 = write_gguf(folder, f"{folder}/model-bf16.gguf")
    files = {"BF16": ("bf16", bf16), "Q8_0": ("int8", quantize(bf16, f"{folder}/model-q8_0.gguf", "q8_0", threads)),
             "Q4_K_M": ("int4", quantize(bf16, f"{folder}/model-q4_k_m.gguf", "q4_k_m", threads))}
    return {f"llama.cpp {name}": (mode, partial(decode_llama, open_llama(path, PROMPT + NEW + 8, PROMPT, threads), ids))
            for name, (mode, path) in files.items()}


def open_llama(path, n_ctx: int, n_batch: int, threads: int):
    """A llama.cpp model (quietly loaded; closed at the bench's end, see LLAMAS), without llama.cpp's
    extra CPU buffer types (AMX tiles, repacked weights): with them, llama-cpp-python 0.3.36 built
    natively on an AMX Xeon aborts on this DeepSeek-2 graph at Q8_0 (GGML_ASSERT(*cur_backend_id != -1)
    in ggml-backend.cpp) and fails at Q4_K_M; BF16 decodes at the same speed with or without them
    (425 vs 422 tok/s, k2-small, 2 threads). Llama() has no argument for it: its model parameters
    are patched while it loads."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    from bench.gguf import quiet
    defaults = low.llama_model_default_params

    def no_extra_buffers():
        params = defaults()
        if not any(name == "use_extra_bufts" for name, *_ in type(params)._fields_):
            raise RuntimeError("llama-cpp-python without use_extra_bufts in its model parameters (0.3.36 has it)")
        params.use_extra_bufts = False
        return params
    low.llama_model_default_params = no_extra_buffers
    try:
        with quiet():
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                                  n_threads_batch=threads, verbose=False)
    finally:
        low.llama_model_default_params = defaults
    LLAMAS.append(llm)
    return llm


def prefill_table(ours, theirs, cfg, folder: str, threads: int, reps: int) -> None:
    """One prompt's prefill (512 and 4,000 tokens, to the first token's logits), side by side: openk2's
    bare forward into a fresh cache, the Engine as configured by default (alone, the prompt prefills in
    chunks of idle_prefill_chunk, 4,096) and in chunks of 512 and 1,024 (what it does beside decoding
    rows, prefill_chunk), transformers' forward, llama.cpp BF16 (its default micro-batch of 512)."""
    llama = open_llama(f"{folder}/model-bf16.gguf", 4096, 512, threads) if LLAMAS else None
    print("\n| prefill of one prompt | tokens | tok/s | vs llama.cpp BF16 | vs bare forward |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for n in (512, 4000):
        def prompt(rep: int):  # a new prompt each round, the same for every row: its routing is new too
            gen = torch.Generator().manual_seed(n + 7919 * rep)
            return torch.randint(0, cfg.vocab_size // 2, (1, n), generator=gen)

        def engine(ids, chunk=None):
            sizes = {} if chunk is None else {"prefill_chunk": chunk, "idle_prefill_chunk": chunk}
            e = Engine(ours, EngineConfig(cache_tokens=n + 64, max_batch=1, **sizes))
            e.add_request(ids[0].tolist(), SamplingParams(max_tokens=1))
            e.run()
        last = torch.zeros(1, n, dtype=torch.bool)
        last[0, -1] = True  # the first token's logits only, as the Engine, transformers and llama.cpp
        rows = {"openk2 bf16, bare forward": lambda ids: ours(ids, 0, ours.new_cache(1, n + 1), keep=last),
                "openk2 bf16, Engine (default)": engine,
                "openk2 bf16, Engine (chunk 512)": partial(engine, chunk=512),
                "openk2 bf16, Engine (chunk 1024)": partial(engine, chunk=1024),
                "transformers bf16": lambda ids: theirs(ids, use_cache=False, logits_to_keep=1)}
        if llama is not None:
            rows["llama.cpp BF16"] = lambda ids: (llama.reset(), llama.eval(ids[0].tolist()))
        times = {name: [] for name in rows}
        for fn in rows.values():
            fn(prompt(0))  # warm-up
        for rep in range(1, reps + 1):
            ids = prompt(rep)
            for name, fn in rows.items():
                t0 = time.perf_counter()
                fn(ids)
                times[name].append(time.perf_counter() - t0)
        tok_s = {name: n / statistics.median(t) for name, t in times.items()}
        for name, v in tok_s.items():
            vs = f"{v / tok_s['llama.cpp BF16']:.2f}×" if llama is not None else "—"
            print(f"| {name} | {n} | {v:.0f} | {vs} | {v / tok_s['openk2 bf16, bare forward']:.2f}× |")


def quant_prefill_table(models, cfg, folder: str, threads: int, reps: int) -> None:
    """One prompt's prefill through the Engine (default chunks) for the quantized models, side by side
    with llama.cpp at the same precision (Q8_0 beside int8, Q4_K_M beside both int4s) and openk2 bf16."""
    peers = {"int8": "Q8_0", "int4": "Q4_K_M", "int4 linears": "Q4_K_M"}
    llamas = {q: open_llama(f"{folder}/model-{q.lower()}.gguf", 4096, 512, threads)
              for q in sorted(set(peers.values()))} if LLAMAS else {}
    print("\n| prefill of one prompt, quantized | tokens | tok/s | vs llama.cpp, same precision | vs openk2 bf16 |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for n in (512, 4000):
        def engine(model, ids):
            e = Engine(model, EngineConfig(cache_tokens=n + 64, max_batch=1))
            e.add_request(ids[0].tolist(), SamplingParams(max_tokens=1))
            e.run()
        rows = {f"openk2 {fmt}, Engine": partial(engine, models[fmt]) for fmt in ("bf16", *peers)}
        rows |= {f"llama.cpp {q}": (lambda llm: lambda ids: (llm.reset(), llm.eval(ids[0].tolist())))(llm)
                 for q, llm in llamas.items()}
        times = {name: [] for name in rows}
        for rep in range(reps + 1):  # round 0 warms up
            ids = torch.randint(0, cfg.vocab_size // 2, (1, n), generator=torch.Generator().manual_seed(n + 31 * rep))
            for name, fn in rows.items():
                t0 = time.perf_counter()
                fn(ids)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        tok_s = {name: n / statistics.median(t) for name, t in times.items()}
        for name, v in tok_s.items():
            fmt = name.removeprefix("openk2 ").removesuffix(", Engine")
            peer = f"llama.cpp {peers[fmt]}" if fmt in peers else None
            vs = f"{v / tok_s[peer]:.2f}×" if peer in tok_s else "—"
            print(f"| {name} | {n} | {v:.0f} | {vs} | {v / tok_s['openk2 bf16, Engine']:.2f}× |")


class Streamer:
    """The time to read `nbytes` once, measured now: an fp32 sum over a slice of a 1 GiB buffer, each call
    a slice the last calls did not touch (so it comes from memory, as a step's weights do). A decode
    step's floor taken beside the step itself moves with the machine as the step does; a bandwidth
    measured once, minutes earlier, does not (on a shared 2-core machine the same step drifted 12.7-18.3
    ms within half an hour, 2026-12-07)."""

    def __init__(self):
        self.buf, self.at = torch.ones(2**30 // 4), 0

    def __call__(self, nbytes: float) -> float:
        n = int(nbytes) // 4
        if n > self.buf.numel():  # never a shorter read than asked
            self.buf = torch.ones(2 * n)
        if self.at + n > self.buf.numel():
            self.at = 0
        part, self.at = self.buf[self.at:self.at + n], self.at + n
        t0 = time.perf_counter()
        part.sum()
        return time.perf_counter() - t0


def batch_floor(model, cfg, gbs: float, batch: int = 32, steps: int = 24) -> None:
    """A decode step at `batch` rows against its own floor: the time to stream, once, the weights that
    step must read — every non-expert weight and the union of the routed experts its rows chose, per
    layer — at the bandwidth measured at the start of this run, and read right after each step (a
    `Streamer` of that step's bytes; the median of the steps' ratios). The unions come from an eager
    engine (its MoE layers record their per-expert load); the step times from a compiled one, on the
    same prompts, step for step."""
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    rest = active_bytes(cfg, "bf16") - cfg.n_moe_layers * cfg.num_experts_per_tok * expert_bytes
    moe = [layer.mlp for layer in model.layers if layer.mlp.__class__.__name__ == "MoE"]
    stream, times, unions, beside = Streamer(), {}, [], {}
    for compile in (False, True):
        engine = Engine(model, EngineConfig(cache_tokens=batch * (PROMPT + steps + 8), max_batch=batch,
                                            compile=compile))
        engine.warmup()
        gen = torch.Generator().manual_seed(5)
        for _ in range(batch):
            engine.add_request(torch.randint(0, cfg.vocab_size // 2, (PROMPT,), generator=gen).tolist(),
                               SamplingParams(max_tokens=steps))
        times[compile], beside[compile] = [], []
        while engine.has_work():
            decoding = len(engine.running) == batch and all(r.prefilled == len(r.prompt) for r in engine.running)
            t0 = time.perf_counter()
            engine.step()
            if decoding:
                times[compile].append(time.perf_counter() - t0)
                if not compile:
                    unions.append(sum(int((m.load > 0).sum()) for m in moe))
                union = unions[min(len(times[compile]), len(unions)) - 1]  # the eager run's at this step
                beside[compile].append(stream(rest + union * expert_bytes))
    union = statistics.median(unions)
    floor = (rest + union * expert_bytes) / (gbs * 1e9)
    near = statistics.median(beside[True])
    print(f"\n| decode step, {batch} rows, bf16 | ms | vs floor | vs the floor read beside it |\n"
          "| --- | ---: | ---: | ---: |")
    print(f"| floor: {rest / 1e6:.0f} MB + {union:.0f} experts ({union * expert_bytes / 1e6:.0f} MB) at {gbs:.1f} "
          f"GB/s; read beside the compiled steps: {near * 1e3:.1f} ms, {floor * gbs / near:.1f} GB/s | "
          f"{floor * 1e3:.1f} | 1.00× | |")
    for compile in (False, True):
        step = statistics.median(times[compile])
        ratio = statistics.median(t / s for t, s in zip(times[compile], beside[compile]))
        print(f"| {'compiled' if compile else 'eager'} step | {step * 1e3:.1f} | {step / floor:.2f}× | "
              f"{ratio:.2f}× |")


def aggregate(model, cfg, batch: int, n_requests: int, compile: bool) -> float:
    config = EngineConfig(cache_tokens=n_requests * (PROMPT + NEW) + 64, max_batch=batch, compile=compile)
    engine = Engine(model, config)
    gen = torch.Generator().manual_seed(0)

    def run() -> float:
        for _ in range(n_requests):
            engine.add_request(torch.randint(0, cfg.vocab_size // 2, (PROMPT,), generator=gen).tolist(),
                               SamplingParams(max_tokens=NEW))
        t0 = time.perf_counter()
        engine.run()
        return n_requests * NEW / (time.perf_counter() - t0)
    run()  # warm-up (compiles this batch regime's graphs when compiling)
    return run()


def decode_table(models, theirs, peers, ids, cfg, gbs: float, reps: int) -> None:
    """Batch-1 decode, round-robin: transformers, openk2 eager and compiled at each precision, and
    llama.cpp's rows (`peers`), against the roofline at the measured bandwidth `gbs`."""
    rows = {"transformers bf16": ("bf16", lambda: decode_theirs(theirs, ids)[0])}
    for mode, model in models.items():
        for compile in (False, True):
            rows[f"openk2 {mode}{', compiled' * compile}"] = (
                mode, lambda model=model, compile=compile: decode_ours(model, ids, compile)[0])
    rows |= peers
    first = {}
    for name, (_, fn) in rows.items():  # warm-up; compiles the graphs (timed: the first run's cost)
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times = {name: [] for name in rows}
    for _ in range(reps):  # interleaved: a noisy neighbour slows every row alike
        for name, (_, fn) in rows.items():
            times[name].append(fn())
    tok_s = {name: statistics.median(t) for name, t in times.items()}
    base = tok_s["transformers bf16"]
    print("\n| batch-1 decode | tok/s | vs llama.cpp, same precision | vs transformers bf16 | roofline tok/s "
          "| % of roofline |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (mode, _) in rows.items():
        peer = next((p for p, (m, _) in peers.items() if m == mode.split()[0]), None)
        vs = f"{tok_s[name] / tok_s[peer]:.2f}×" if peer and not name.startswith("llama") else "—"
        roof = gbs * 1e9 / active_bytes(cfg, mode)
        warm = f" (first run {first[name]:.0f} s)" if "compiled" in name else ""
        # llama.cpp's Q8_0 / Q4_K_M also narrow what openk2 keeps bf16: openk2's byte count is not theirs
        roofline = "— | —" if name.startswith("llama") and mode != "bf16" else \
            f"{roof:.0f} | {100 * tok_s[name] / roof:.0f}%"
        print(f"| {name}{warm} | {tok_s[name]:.0f} | {vs} | {tok_s[name] / base:.2f}× | {roofline} |")
    if not peers:
        print("(llama.cpp rows need the bench extra: pip install llama-cpp-python gguf)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 repeat, 16 requests for the aggregate")
    tables = ("decode", "prefill", "qprefill", "floor", "aggregate")
    ap.add_argument("--only", nargs="+", choices=tables, default=tables, help="the tables to print (default: all)")
    ap.add_argument("--aggregate-formats", nargs="+", choices=("bf16", "int8", "int4"), default=["bf16"],
                    help="the weight formats of the aggregate table (default: bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    cfg, reps = PRESETS[args.preset], 1 if args.quick else 3
    gbs = bandwidth_gbs()
    from openk2 import kernels
    tiles = "AMX tiles" if kernels.load() and linear.PAIRS_ROWS.get(torch.bfloat16) else "no AMX"
    print(f"{machine_line(args.threads)} | preset {args.preset} | measured bandwidth {gbs:.1f} GB/s | "
          f"bf16/int8/int4 kernels: {tiles}")
    ids = torch.randint(0, cfg.vocab_size // 2, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        ours, theirs = load_pair(cfg, torch.bfloat16, tmp)
        models = {"bf16": ours, "int8": quantize_model(copy.deepcopy(ours), "int8"),
                  "int4": quantize_model(copy.deepcopy(ours), "int4"),  # K2-Thinking's: routed experts only
                  "int4 linears": quantize_model(copy.deepcopy(ours), "int4", linears=True)}  # as Q4_K_M, all
        peers = llama_cpp_rows(tmp, ids, args.threads)  # also writes the GGUFs the prefill table reads
        if "decode" in args.only:
            decode_table(models, theirs, peers, ids, cfg, gbs, reps)
        if "prefill" in args.only:
            prefill_table(ours, theirs, cfg, tmp, args.threads, reps)
        if "qprefill" in args.only:
            quant_prefill_table(models, cfg, tmp, args.threads, reps)
        if "floor" in args.only:
            batch_floor(ours, cfg, gbs)
        for llm in LLAMAS:
            llm.close()
        if "aggregate" not in args.only:
            return
        n = 16 if args.quick else 32
        for fmt in args.aggregate_formats:
            print(f"\n| Engine, {fmt}, {n} requests × {NEW} tokens | eager tok/s | vs batch 1 | compiled tok/s | "
                  "vs batch 1 |\n| --- | ---: | ---: | ---: | ---: |")
            base = {}
            for batch in (1, 8, 32):
                row = f"| max_batch {batch} |"
                for compile in (False, True):
                    tok_s = aggregate(models[fmt], cfg, batch, n, compile)
                    base.setdefault(compile, tok_s)
                    row += f" {tok_s:.0f} | {tok_s / base[compile]:.1f}× |"
                print(row)


if __name__ == "__main__":
    main()
