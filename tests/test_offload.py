"""Expert offload (openk2.offload): routed experts read from the checkpoint into a bounded cache give
exactly the fully resident model's logits, in every stored format, through the model, the Engine, the
CLI and the server; the cache's policies, errors and memory plan."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from openk2.checkpoint import load_hf, save_hf
from openk2.config import PRESETS
from openk2.engine import SamplingParams
from openk2.engine.engine import Engine, EngineConfig
from openk2.info import offload_report, resident_bytes
from openk2.model import build_model
from openk2.offload import ExpertCache, ExpertStore, OffloadedExperts, expert_bytes, load_offloaded

CFG = PRESETS["k2-tiny"]  # 2 MoE layers of 16 experts, top-4
EXPERT = expert_bytes(CFG, torch.bfloat16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    model = build_model(CFG, dtype=torch.bfloat16, seed=5).eval()
    out = {}
    for fmt in ("bf16", "fp8", "int4"):
        out[fmt] = save_hf(model, tmp_path_factory.mktemp(fmt), fmt=fmt, progress=False)
    return out


def _ids(B=2, S=24, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "int4"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_logits_equal_the_resident_model_bit_for_bit(folders, fmt, policy):
    resident = load_hf(folders[fmt], progress=False).eval()
    with torch.inference_mode():  # the cache made in inference mode, filled by reader threads without it
        dtype = torch.float32 if fmt == "int4" else torch.bfloat16
        model = load_offloaded(folders[fmt], 5 * expert_bytes(CFG, dtype), dtype, policy=policy,
                               progress=False).eval()  # 5 of 32 experts
    if fmt == "int4":  # stored bf16 scales, computed in fp32: converted on the way into the cache
        resident = load_hf(folders[fmt], torch.float32, progress=False).eval()
    cache = model.expert_cache
    assert cache.slots == 5 and isinstance(model.layers[1].mlp.experts, OffloadedExperts)
    assert not any("experts.gate_up_proj" in n for n, _ in model.named_parameters())
    with torch.inference_mode():
        for reference in (False, True):
            assert torch.equal(model(_ids(), reference=reference), resident(_ids(), reference=reference))
    s = cache.stats()
    assert s["misses"] > 32 and s["evictions"] == s["misses"] - 5  # it cycled through its 5 slots
    assert s["bytes"] == 5 * expert_bytes(CFG, dtype) and s["stall_s"] > 0
    stored = {"bf16": EXPERT, "fp8": EXPERT // 2, "int4": EXPERT // 4}[fmt]
    assert stored <= s["bytes_read"] / s["misses"] <= 1.2 * stored  # the stored bytes (+ scales), not bf16


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
@pytest.mark.parametrize("kernel", [True, False])
def test_an_int4_cache_equals_the_resident_model_quantized_alike(folders, fmt, kernel, request, monkeypatch):
    """quantize_model(model, "int4") on offloaded experts: the cache holds Int4Experts' codes and scales,
    ~3.6× as many experts in the same bytes, and the logits equal the resident model quantized the same
    way, bit for bit: few rows an expert (the int4 kernel, or its absence) and many (dequantised, in one
    kernel call with AMX)."""
    from openk2.model import linear
    from openk2.quant import fake_quantize, quantize_model
    if kernel:
        request.getfixturevalue("cpu_kernels")
    else:
        monkeypatch.setattr(linear, "PAIRS_KERNELS", {})
    dtype = torch.float32 if fmt == "int4" else torch.bfloat16
    resident = quantize_model(load_hf(folders[fmt], dtype, progress=False).eval(), "int4")
    with torch.inference_mode():
        model = load_offloaded(folders[fmt], 4 * expert_bytes(CFG, dtype), dtype, progress=False).eval()
        quantize_model(model, "int4")
    cache = model.expert_cache  # 4 float experts' bytes: 14 experts as int4 with bf16 scales, 25 with fp32
    assert cache.format == "int4" and cache.slots == 4 * expert_bytes(CFG, dtype) // expert_bytes(CFG, dtype, "int4")
    assert 14 <= cache.slots < 32 and cache.nbytes <= 4 * expert_bytes(CFG, dtype)  # of 32: it still evicts
    with torch.inference_mode():
        for ids in (_ids(1, 3), _ids(4, 64)):  # 12 pairs over ≤ 12 experts (kernel); 1,024 over 16 (not)
            assert torch.equal(model(ids), resident(ids))
        assert torch.equal(model(_ids(), reference=True), resident(_ids(), reference=True))
    s = cache.stats()
    assert s["format"] == "int4" and s["evictions"] > 0 and s["misses"] > cache.slots
    runs = {}  # and through the Engine (eager for both: offloaded experts do not compile)
    for name, m in (("resident", resident), ("offloaded", model)):
        engine = Engine(m, EngineConfig(cache_tokens=128, block_size=8, compile=False))
        req = engine.add_request(_ids(1, 9)[0].tolist(), SamplingParams(max_tokens=8, logprobs=1))
        engine.run()
        runs[name] = req.output, [lp.logprob for lp in req.logprobs]
    assert runs["offloaded"] == runs["resident"]
    with pytest.raises(TypeError, match="read from disk"):
        fake_quantize(model, "int4")
    int8 = load_offloaded(folders[fmt], 4 * expert_bytes(CFG, dtype), dtype, progress=False)
    quantize_model(int8, "int8")  # the other linears int8; the experts stay in the load dtype
    assert int8.expert_cache.format == "float" and type(int8.layers[0].mlp.down_proj).__name__ == "Int8Linear"


@pytest.mark.parametrize("slots,prefetch", [(6, True), (4, True), (6, False)])
def test_engine_decodes_the_resident_models_tokens_and_logprobs(folders, slots, prefetch):
    """Continuous batching (two requests, chunked prefill) over a cache that cannot hold one prompt's
    experts (4 slots: exactly one layer's top-4, so a prefetch must give its slot back): the same tokens
    and log-probs as the resident model in the same engine, whether the next layer's experts are
    prefetched or not."""
    runs = {}
    offloaded = load_offloaded(folders["bf16"], slots * EXPERT, progress=False, prefetch=prefetch)
    for name, model in (("resident", load_hf(folders["bf16"], progress=False)), ("offloaded", offloaded)):
        config = EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=7, idle_prefill_chunk=7, compile=True)
        engine = Engine(model.eval(), config)
        assert name == "resident" or engine.compiled is None  # offloaded experts decode eagerly
        if engine.compiled is not None:
            engine.compiled = None  # the same (eager) step for both: bit-for-bit comparable
        reqs = [engine.add_request(_ids(1, n, seed=n)[0].tolist(), SamplingParams(max_tokens=12, logprobs=2))
                for n in (9, 20)]
        engine.run()
        runs[name] = [(r.output, [(lp.token, lp.logprob, lp.top) for lp in r.logprobs]) for r in reqs]
    assert runs["offloaded"] == runs["resident"]
    s = offloaded.expert_cache.stats()
    assert (s["prefetched"] > 0) == prefetch and s["prefetch_used"] <= s["prefetched"]
    assert len(offloaded.expert_cache.where) + len(offloaded.expert_cache.pending) + len(
        offloaded.expert_cache.free) == slots  # every slot accounted for once


def test_policies_evict_the_least_recently_or_least_often_used(folders):
    for policy, expect in (("lru", {(1, 2), (1, 3)}), ("lfu", {(1, 1), (1, 3)})):
        cache = ExpertCache(ExpertStore(folders["bf16"], CFG), 4, torch.bfloat16, policy=policy)
        for experts in ([0, 1, 2, 3], [1], [1], [0, 2], [3]):
            cache.fetch(1, experts)
        # recency 1, 0, 2, 3 (oldest first); uses 0: 2, 1: 3, 2: 2, 3: 2. Two evictions: LRU drops 1 and 0,
        # LFU the least used, the older first among equals: 0 and 2 (1, used most, stays)
        cache.fetch(1, [4, 5])
        assert set(cache.where) - {(1, 4), (1, 5)} == expect, policy
        assert (cache.hits, cache.misses) == (5, 6)
        slots = cache.fetch(1, [0, 4])
        w = load_hf(folders["bf16"], progress=False).layers[1].mlp.experts
        assert torch.equal(cache.gate_up_S2FD[slots[0]], w.gate_up_proj[0])
        assert torch.equal(cache.down_SDF[slots[1]], w.down_proj[4])


def test_clear_errors(folders, tmp_path):
    with pytest.raises(ValueError, match="cannot hold one layer's top-4: give it at least"):
        load_offloaded(folders["bf16"], 3 * EXPERT, progress=False)
    with pytest.raises(ValueError, match="policy must be one of lru, lfu"):
        load_offloaded(folders["bf16"], 8 * EXPERT, policy="fifo", progress=False)
    broken = shutil.copytree(folders["bf16"], tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.2.mlp.experts.3.up_proj.weight"] = "model-00009-of-00009.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="missing shard .*model-00009-of-00009.safetensors"):
        load_offloaded(broken, 8 * EXPERT, progress=False)
    with pytest.raises(ValueError, match="a preset has none"):
        from openk2.cli import _load
        _load("k2-tiny", None, 0, expert_cache=1.0)


def test_a_read_error_mid_decode_fails_that_step_and_the_cache_recovers(folders, tmp_path):
    folder = shutil.copytree(folders["bf16"], tmp_path / "model")
    model = load_offloaded(folder, 6 * EXPERT, progress=False).eval()
    shard = next(folder.glob("*.safetensors"))
    data = shard.read_bytes()
    with open(shard, "r+b") as f:
        f.truncate(len(data) // 2)  # the disk "loses" the second half of the experts
    engine = Engine(model, EngineConfig(cache_tokens=256, block_size=8))
    engine.add_request(_ids(1, 20)[0].tolist(), SamplingParams(max_tokens=4))
    with pytest.raises(OSError, match="cut short"):
        engine.run()
    assert all(slot not in model.expert_cache.free for slot in model.expert_cache.where.values())
    shard.write_bytes(data)  # the disk is back: the same cache serves, with the right weights
    resident = load_hf(folder, progress=False).eval()
    with torch.inference_mode():
        assert torch.equal(model(_ids()), resident(_ids()))


def test_cli_generate_with_an_expert_cache_prints_the_same_tokens_and_the_cache_stats(folders):
    def run(*extra):
        cmd = [sys.executable, "-m", "openk2", "generate", str(folders["int4"]), "--prompt-ids", "5,6,7,8",
               "--max-tokens", "6", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    full, cached = run(), run("--expert-cache", str(4 * EXPERT / 1e9))
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout == full.stdout and len(full.stdout.split()) == 6
    assert "expert cache: 4/4 experts" in cached.stderr and "hit rate" in cached.stderr
    full4, cached4 = run("--quantize", "int4"), run("--quantize", "int4", "--expert-cache", str(4 * EXPERT / 1e9))
    assert cached4.returncode == 0, cached4.stderr
    assert cached4.stdout == full4.stdout and "experts (0.00 GB, int4, lru)" in cached4.stderr
    small = run("--expert-cache", "1e-6")
    assert small.returncode == 1 and "cannot hold one layer's top-4" in small.stderr
    assert "Traceback" not in small.stderr


def test_offload_report_predicts_the_split(folders):
    model = load_offloaded(folders["bf16"], 4 * EXPERT, progress=False)
    assert resident_bytes(CFG) == sum(t.nbytes for t in [*model.parameters(), *model.buffers()]
                                      if t is not model.inv_freq)
    k2 = offload_report(PRESETS["kimi-k2"], 8)
    assert f"{60 * 384:,} of {3 * 7168 * 2048 * 2 / 1e6:,.1f} MB each" in k2
    int4_disk = float(next(line for line in k2.splitlines() if line.strip().startswith("int4")).split("|")[1]
                      .strip().removesuffix(" GB").replace(",", ""))
    assert 580 < int4_disk < 610  # K2-Thinking's int4 release is ~594 GB
    assert "64 GB | no |" in k2 and "the least that works: one layer's top-8, 0.70 GB" in k2
    per = 3 * 7168 * 2048  # weights an expert: bf16 slots first, then their bytes in int4 + bf16 scales
    assert f"holds          {int(8e9 // (2 * per)) * 2 * per // (per // 2 + per // 16):,} experts as int4" in k2


def test_server_answers_through_the_cache_fails_a_read_error_cleanly_and_keeps_serving(folders, tmp_path):
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from test_server import serving

    from openk2.server import create_app
    from openk2.tokenizer import Tokenizer

    folder = shutil.copytree(folders["bf16"], tmp_path / "model")
    model = load_offloaded(folder, 12 * EXPERT, progress=False).eval()
    with serving(create_app(model, Tokenizer.byte_level(), "tiny")) as port:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def ask():
            return c.completions.create(model="tiny", prompt="the cache", max_tokens=6, temperature=0)
        first = ask().choices[0].text
        shard = next(folder.glob("*.safetensors"))
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])  # a disk read error mid-decode
        model.expert_cache.where.clear()  # make the next request read
        model.expert_cache.free = list(range(model.expert_cache.slots))
        with pytest.raises(openai.InternalServerError):
            ask()
        shard.write_bytes(data)
        assert ask().choices[0].text == first  # still serving, the same answer
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    hits = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("openk2_expert_cache_hits ")))
    assert hits == model.expert_cache.hits > 0 and "openk2_expert_cache_read_bytes" in metrics


def test_an_int4_cache_over_an_int4_checkpoint_holds_its_own_codes(tmp_path):
    """An INT4 checkpoint's experts go into an int4 cache as stored (codes repacked, scales copied), not
    dequantised to the cache's bf16 and quantised again (which changes ~1 scale in 10): the cache holds
    the checkpoint's exact values. `quantize_model` on the resident model keeps them too (unless the
    weights moved since loading), and the logits are equal."""
    from safetensors.torch import load_file

    from openk2.quant import fake_quantize, quantize_model
    from openk2.quant.int4 import dequantize_int4, unpack_int4
    from openk2.quant.int4_decode import Int4Experts, pack_halves, quantize_halves

    # weights from fp32 give bf16 scales of any value, as a quantisation-aware trained checkpoint has
    folder = save_hf(build_model(CFG, dtype=torch.float32, seed=6), tmp_path, fmt="int4", progress=False)
    dtype = torch.bfloat16
    stored = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    def checkpoint(layer, e, proj):  # (codes in the decode layout, scale) as the checkpoint stores them
        base = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        return pack_halves(unpack_int4(stored[base + "_packed"])), stored[base + "_scale"]

    with torch.inference_mode():
        model = load_offloaded(folder, 4 * expert_bytes(CFG, dtype), dtype, progress=False).eval()
        quantize_model(model, "int4")
        out = model(_ids(2, 12))
    cache = model.expert_cache
    assert cache.format == "int4" and len(cache.where) == cache.slots and cache.stats()["misses"] > cache.slots
    requantized_differ = 0
    for (layer, e), slot in cache.where.items():
        codes = ExpertStore.parts(cache.gate_up_S2FD[slot], cache.down_SDF[slot])
        scales = ExpertStore.parts(cache.gate_up_scale[slot], cache.down_scale[slot])
        for (proj, c), (_, s) in zip(codes, scales):
            want_c, want_s = checkpoint(layer, e, proj)
            assert torch.equal(c, want_c) and torch.equal(s, want_s)
            requantized_differ += not torch.equal(quantize_halves(dequantize_int4(
                stored[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight_packed"], want_s, dtype))[1], want_s)
    assert requantized_differ > 0  # the old way, via the dequantised bf16 weight: what the direct path avoids
    # resident, `quantize_model` keeps the checkpoint's codes too (the loader tells the experts where they are)
    resident = quantize_model(load_hf(folder, dtype, progress=False).eval(), "int4")
    for layer, block in enumerate(resident.layers):
        if CFG.is_moe_layer(layer):
            q, F_ = block.mlp.experts, CFG.moe_intermediate_size
            for e in range(CFG.n_routed_experts):
                for proj, rows in (("gate_proj", slice(0, F_)), ("up_proj", slice(F_, 2 * F_))):
                    assert torch.equal(q.gate_up_q[e, rows], checkpoint(layer, e, proj)[0])
                    assert torch.equal(q.gate_up_scale[e, rows], checkpoint(layer, e, proj)[1])
                assert torch.equal(q.down_q[e], checkpoint(layer, e, "down_proj")[0])
                assert torch.equal(q.down_scale[e], checkpoint(layer, e, "down_proj")[1])
    with torch.inference_mode():
        assert torch.equal(out, resident(_ids(2, 12)))
    moved = load_hf(folder, dtype, progress=False)  # weights trained since loading: quantised afresh
    with torch.no_grad():
        moved.layers[1].mlp.experts.down_proj[0, 0, 0] += 0.5
    q = Int4Experts.from_experts(moved.layers[1].mlp.experts)
    fresh = Int4Experts.from_weights(moved.layers[1].mlp.experts.gate_up_proj, moved.layers[1].mlp.experts.down_proj)
    assert torch.equal(q.down_q, fresh.down_q) and not torch.equal(q.down_q[0], checkpoint(1, 0, "down_proj")[0])
    kept = load_hf(folder, dtype, progress=False)  # fake_quantize leaves weights on the checkpoint's grid as they are
    before = kept.layers[1].mlp.experts.gate_up_proj.clone()
    assert torch.equal(fake_quantize(kept, "int4").layers[1].mlp.experts.gate_up_proj, before)
