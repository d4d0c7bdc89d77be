"""HF checkpoint folders: round trips, K2's names, block FP8 and INT4 storage, errors, config.json.

Expected names, shapes, dtypes and formulas are written out here from K2-SPEC §1 and §4, not taken
from `openk2.checkpoint.hf`, so a wrong table there cannot agree with itself.
"""

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.checkpoint import load_hf, save_hf
from openk2.config import KIMI_K2, PRESETS, ModelConfig
from openk2.model import build_model
from openk2.quant.fp8 import dequantize_fp8, quantize_fp8
from openk2.quant.int4 import dequantize_int4, quantize_int4

# layer 0 dense, layer 1 MoE; hidden 160 and intermediate 320 give several (partial) 128-tiles,
# and every routed-expert input dim (160, 64) is a multiple of the INT4 group of 32
CFG = dataclasses.replace(
    PRESETS["k2-tiny"], vocab_size=200, hidden_size=160, intermediate_size=320, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1)
E = CFG.n_routed_experts


def _model(seed: int = 0):
    """Random weights, norms != 1 and a non-zero router bias, so every tensor carries information."""
    model = build_model(CFG, dtype=torch.float32, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def _expected_shapes(cfg: ModelConfig = CFG) -> dict[str, tuple[int, ...]]:
    """K2-SPEC §4.1 for a config with q_lora_rank, first_k_dense_replace dense layers, the rest MoE."""
    D, H, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Q, P, O, I, F = cfg.q_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.intermediate_size, \
        cfg.moe_intermediate_size
    out = {"model.embed_tokens.weight": (cfg.vocab_size, D), "lm_head.weight": (cfg.vocab_size, D),
           "model.norm.weight": (D,)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                    p + "self_attn.q_a_proj.weight": (Q, D), p + "self_attn.q_a_layernorm.weight": (Q,),
                    p + "self_attn.q_b_proj.weight": (H * (P + R), Q),
                    p + "self_attn.kv_a_proj_with_mqa.weight": (C + R, D),
                    p + "self_attn.kv_a_layernorm.weight": (C,),
                    p + "self_attn.kv_b_proj.weight": (H * (P + O), C), p + "self_attn.o_proj.weight": (D, H * O)})
        if n < cfg.first_k_dense_replace:
            out.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                        p + "mlp.down_proj.weight": (D, I)})
            continue
        out.update({p + "mlp.gate.weight": (cfg.n_routed_experts, D),
                    p + "mlp.gate.e_score_correction_bias": (cfg.n_routed_experts,)})
        for stem in ["mlp.shared_experts"] + [f"mlp.experts.{e}" for e in range(cfg.n_routed_experts)]:
            out.update({p + f"{stem}.gate_proj.weight": (F, D), p + f"{stem}.up_proj.weight": (F, D),
                        p + f"{stem}.down_proj.weight": (D, F)})
    return out


def _fp8_quantised(name: str) -> bool:
    """K2-SPEC §4.2: attention linears, dense MLP, routed and shared experts; nothing else."""
    return re.search(r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                     r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$",
                     name) is not None


def _routed(name: str) -> bool:
    return re.search(r"\.mlp\.experts\.\d+\.", name) is not None


def _hf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names: the stacked experts split by hand (gate rows first)."""
    out = {}
    for name, t in list(model.state_dict().items()):
        stem, _, leaf = name.rpartition(".")
        if stem.endswith("mlp.experts") and leaf == "gate_up_proj":
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{stem}.{e}.gate_proj.weight"] = t[e, :F]
                out[f"{stem}.{e}.up_proj.weight"] = t[e, F:]
        elif stem.endswith("mlp.experts") and leaf == "down_proj":
            out.update({f"{stem}.{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out


def _state_from_hf(model, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `_hf_tensors` onto the model's state-dict keys."""
    out = {}
    for name, t in model.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith("mlp.experts") and leaf == "gate_up_proj":
            out[name] = torch.stack([torch.cat([hf[f"{stem}.{e}.gate_proj.weight"], hf[f"{stem}.{e}.up_proj.weight"]])
                                     for e in range(t.shape[0])])
        elif stem.endswith("mlp.experts") and leaf == "down_proj":
            out[name] = torch.stack([hf[f"{stem}.{e}.down_proj.weight"] for e in range(t.shape[0])])
        else:
            out[name] = hf[name]
    return out


def _file_entries(folder) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """name -> (file, safetensors dtype, shape), read through the index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(folder / file, framework="pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (file, s.get_dtype(), tuple(s.get_shape()))
    assert {k: v[0] for k, v in out.items()} == index["weight_map"]  # index and files agree
    return out


def _read_all(folder) -> dict[str, tuple[str, torch.Tensor]]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, framework="pt") as f:
            out[name] = (file, f.get_tensor(name))
    return out


def _write_all(folder, entries: dict[str, tuple[str, torch.Tensor]]):
    """Replace the folder's shards and index by `entries` (name -> (file, tensor))."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, (file, t) in entries.items():
        files.setdefault(file, {})[name] = t.contiguous()
    for file, tensors in files.items():
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: file for name, (file, _) in entries.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _ids(seed: int = 0):
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


# --- plain round trip ------------------------------------------------------------------------------
def test_roundtrip_is_identity_with_sharded_index(tmp_path):
    model = _model()
    save_hf(model, tmp_path, max_shard_bytes=100_000, progress=False)
    files = _file_entries(tmp_path)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()

    expected = _expected_shapes()
    assert {k: v[2] for k, v in files.items()} == expected  # K2's names and shapes, nothing else
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in files
    assert {v[1] for v in files.values()} == {"F32"}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * sum(math.prod(s) for s in expected.values())
    assert dataclasses.replace(ModelConfig.from_json(tmp_path), extra={}) == CFG

    loaded = load_hf(tmp_path, dtype=torch.float32, progress=False)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        assert theirs[name].dtype == torch.float32 and torch.equal(ours[name], theirs[name]), name
    assert torch.equal(loaded(_ids()), model(_ids()))


def test_bf16_save_keeps_router_bias_fp32(tmp_path):
    model = _model()
    save_hf(model, tmp_path, dtype=torch.bfloat16, progress=False)
    files = _file_entries(tmp_path)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert files[bias][1] == "F32"
    assert {v[1] for k, v in files.items() if k != bias} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"

    loaded = load_hf(tmp_path, progress=False)  # dtype from config.json
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    got = loaded.layers[1].mlp.gate.e_score_correction_bias
    assert got.dtype == torch.float32 and torch.equal(got, model.layers[1].mlp.gate.e_score_correction_bias)
    assert torch.equal(loaded.layers[1].mlp.experts.down_proj, model.layers[1].mlp.experts.down_proj.bfloat16())


# --- block FP8 (K2-SPEC §4.2) --------------------------------------------------------------------
def _spec_dequant(w, s, bs=128):  # K2-SPEC §4.2, verbatim
    s = s.repeat_interleave(bs, 0)[: w.shape[0]].repeat_interleave(bs, 1)[:, : w.shape[1]]
    return (w.float() * s).to(torch.bfloat16)


def _index_dequant(w, s, bs=128):  # W[i, j] = float(W_fp8[i, j]) · scale_inv[i // 128, j // 128]
    i = torch.arange(w.shape[0])[:, None] // bs
    j = torch.arange(w.shape[1])[None, :] // bs
    return w.float() * s[i, j]


def _tiled_weight(rows, cols, seed=0):
    """Normal weights whose 128x128 tiles differ in magnitude by up to 10^3, so a tile mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (3 * torch.rand(-(-rows // 128), -(-cols // 128), generator=g) - 2)
    return torch.randn(rows, cols, generator=g) * _index_dequant(torch.ones(rows, cols), mag)


@pytest.mark.parametrize("shape", [(200, 300), (576, 160), (128, 256), (7, 5)])
def test_quantize_fp8_tiles_scales_and_error(shape):
    rows, cols = shape
    w = _tiled_weight(rows, cols)
    w_fp8, scale_inv = quantize_fp8(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
    for r in range(scale_inv.shape[0]):
        for c in range(scale_inv.shape[1]):
            tile = w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
            assert scale_inv[r, c] == tile.abs().max() / 448  # scale_inv = amax(|tile|) / 448
            q = w_fp8[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].float()
            assert q.abs().max() == 448  # each tile's amax lands on e4m3's largest value

    dq = dequantize_fp8(w_fp8, scale_inv)
    assert dq.dtype == torch.float32
    assert torch.equal(dq, _index_dequant(w_fp8, scale_inv))
    assert torch.equal(dq.bfloat16(), _spec_dequant(w_fp8, scale_inv))
    # e4m3 keeps 3 mantissa bits: round-to-nearest errs by <= 2^-4 relative for normals, and by
    # <= 2^-10 (half the subnormal step 2^-9) below 2^-6, both in units of the tile's scale
    s = _index_dequant(torch.ones(rows, cols), scale_inv)
    bound = 2.0 ** -4 * w.abs() + 2.0 ** -10 * s + 1e-6 * w.abs()
    assert ((dq - w).abs() <= bound).all()
    assert (dq - w).abs().max() > 0  # it did quantise


def test_dequantize_fp8_matches_spec_formula_on_arbitrary_codes():
    g = torch.Generator().manual_seed(3)
    w_fp8 = (torch.randn(300, 200, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(3, 2, generator=g) + 0.01
    dq = dequantize_fp8(w_fp8, scale_inv)
    assert torch.equal(dq, _index_dequant(w_fp8, scale_inv))
    assert torch.equal(dq.bfloat16(), _spec_dequant(w_fp8, scale_inv))


def _fp8_reference_state(model, dtype=torch.bfloat16):
    """What an FP8 folder must load to: quantised linears as dequant(quant(w)), the rest in `dtype`,
    the router bias in fp32."""
    ref = {}
    for name, t in _hf_tensors(model).items():
        if _fp8_quantised(name):
            ref[name] = _index_dequant(*quantize_fp8(t))
        elif name.endswith("e_score_correction_bias"):
            ref[name] = t.float()
        else:
            ref[name] = t.to(dtype).float()
    return _state_from_hf(model, ref)


def test_save_fp8_layout_and_load(tmp_path):
    model = _model()
    save_hf(model, tmp_path, fmt="fp8", dtype=torch.bfloat16, max_shard_bytes=60_000, progress=False)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]}
    files = _file_entries(tmp_path)
    expected = _expected_shapes()
    quantised = {n for n in expected if _fp8_quantised(n)}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in quantised
    assert set(files) == set(expected) | {n + "_scale_inv" for n in quantised}
    for name, shape in expected.items():
        file_dtype = files[name][1]
        if name in quantised:
            assert file_dtype == "F8_E4M3", name
            scale = files[name + "_scale_inv"]
            assert scale[1] == "F32" and scale[2] == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), name
        elif name.endswith("e_score_correction_bias"):
            assert file_dtype == "F32"
        else:  # embed_tokens, lm_head, norms, router weight
            assert file_dtype == "BF16", name
    assert files["model.layers.0.mlp.gate_proj.weight_scale_inv"][2] == (3, 2)  # 320 x 160: partial tiles

    loaded = load_hf(tmp_path, dtype=torch.float32, progress=False)
    assert "quantization_config" not in loaded.cfg.extra  # the loaded model holds plain weights
    want = _fp8_reference_state(model)
    got = loaded.state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    reference = build_model(CFG, dtype=torch.float32)
    reference.load_state_dict(want)
    ids = _ids()
    assert torch.equal(loaded(ids), reference(ids))
    assert (loaded(ids) - model(ids)).abs().max() > 1e-4  # and the weights really went through FP8


def test_fp8_scale_in_another_shard(tmp_path):
    save_hf(_model(), tmp_path, fmt="fp8", progress=False)
    plain = load_hf(tmp_path, dtype=torch.float32, progress=False).state_dict()
    entries = _read_all(tmp_path)
    moved = {n: ("scales.safetensors", t) if n.endswith("_scale_inv") else ("weights.safetensors", t)
             for n, (_, t) in entries.items()}
    _write_all(tmp_path, moved)
    assert sum(n.endswith("_scale_inv") for n in moved) > 10
    got = load_hf(tmp_path, dtype=torch.float32, progress=False).state_dict()
    for name in plain:
        assert torch.equal(got[name], plain[name]), name


# --- INT4 (K2-SPEC §4.3) -------------------------------------------------------------------------
def _i32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def _pack_by_hand(codes: list[int]) -> int:
    return _i32(sum(c << (4 * k) for k, c in enumerate(codes)))


def test_int4_packing_by_hand():
    q = [1, -2, 3, -4, 5, -6, 7, 0, -7, 6, -5, 4, -3, 2, -1, 0] + [0] * 16  # amax 7 -> scale 1
    w = torch.tensor([q, [v * 0.5 for v in q]], dtype=torch.float32)
    packed, scale = quantize_int4(w, scale_dtype=torch.bfloat16)
    assert packed.dtype == torch.int32 and packed.shape == (2, 4)
    assert scale.shape == (2, 1) and scale.float().flatten().tolist() == [1.0, 0.5]
    row = [_pack_by_hand([v + 8 for v in q[k:k + 8]]) for k in range(0, 32, 8)]  # offset-binary codes
    assert row[0] == _pack_by_hand([9, 6, 11, 4, 13, 2, 15, 8]) and row[2] == _i32(0x88888888)
    assert packed.tolist() == [row, row]
    assert torch.equal(dequantize_int4(packed, scale), w)

    # dequant on hand-made words: lowest nibble first, W = (code - 8) · scale
    words = torch.tensor([[_i32(0x76543210), _i32(0xFEDCBA98), _i32(0x88888888), _i32(0x8888888F)]],
                         dtype=torch.int32)
    want = [float(c - 8) * 0.25 for c in range(16)] + [0.0] * 8 + [1.75] + [0.0] * 7
    scale = torch.tensor([[0.25]], dtype=torch.bfloat16)
    assert dequantize_int4(words, scale, shape=[1, 32]).flatten().tolist() == want


def test_int4_round_trip_error():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 128, generator=g) * 10 ** (2 * torch.rand(48, 4, 1, generator=g) - 1).repeat(1, 1, 32) \
        .flatten(1)
    packed, scale = quantize_int4(w, scale_dtype=torch.bfloat16)
    assert packed.shape == (48, 16) and scale.shape == (48, 4) and scale.dtype == torch.bfloat16
    dq = dequantize_int4(packed, scale)
    s = scale.float().repeat_interleave(32, 1)
    amax = w.abs().unflatten(1, (4, 32)).amax(-1).repeat_interleave(32, 1)
    # round to nearest (half a step), plus clipping at ±7 steps when the bf16 scale rounded down
    assert ((dq - w).abs() <= 0.5 * s + (amax - 7 * s).clamp(min=0) + 1e-6 * amax).all()
    # already on the grid: a fixed point
    assert torch.equal(dequantize_int4(*quantize_int4(dq, scale_dtype=torch.bfloat16)), dq)


def test_save_int4_layout_and_load(tmp_path):
    model = _model()
    save_hf(model, tmp_path, fmt="int4", dtype=torch.bfloat16, progress=False)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    wq = qc["config_groups"]["group_0"]["weights"]
    assert (wq["num_bits"], wq["type"], wq["symmetric"], wq["strategy"], wq["group_size"]) == \
        (4, "int", True, "group", 32)

    files = _file_entries(tmp_path)
    expected = _expected_shapes()
    routed = {n for n in expected if _routed(n)}
    stems = {n[: -len(".weight")] for n in routed}
    want_names = (set(expected) - routed) | {s + suffix for s in stems
                                             for suffix in (".weight_packed", ".weight_scale", ".weight_shape")}
    assert set(files) == want_names
    for name in routed:
        out, inp = expected[name]
        stem = name[: -len(".weight")]
        assert files[stem + ".weight_packed"][1:] == ("I32", (out, inp // 8))
        assert files[stem + ".weight_scale"][1:] == ("BF16", (out, inp // 32))
    with safe_open(tmp_path / files["model.layers.1.mlp.experts.5.down_proj.weight_shape"][0], "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight_shape").tolist() == [160, 64]
    assert {v[1] for n, v in files.items() if n in expected and not n.endswith("bias")} == {"BF16"}

    loaded = load_hf(tmp_path, dtype=torch.float32, progress=False)
    int4 = lambda t: dequantize_int4(*quantize_int4(t, scale_dtype=torch.bfloat16))  # noqa: E731
    hf_ref = {n: (int4(t) if _routed(n) else t.float() if n.endswith("bias") else t.bfloat16().float())
              for n, t in _hf_tensors(model).items()}
    want = _state_from_hf(model, hf_ref)
    got = loaded.state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    reference = build_model(CFG, dtype=torch.float32)
    reference.load_state_dict(want)
    ids = _ids(1)
    assert torch.equal(loaded(ids), reference(ids))
    assert (loaded(ids) - model(ids)).abs().max() > 1e-4


# --- odd folders and errors ----------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    """A plain fp32 folder of `_model()` in several shards."""
    save_hf(_model(), tmp_path, max_shard_bytes=100_000, progress=False)
    return tmp_path


def test_rotary_inv_freq_is_ignored(folder):
    entries = _read_all(folder)
    for n in range(CFG.num_hidden_layers):  # K2 ships these; shape and dtype unknown, so odd ones
        entries[f"model.layers.{n}.self_attn.rotary_emb.inv_freq"] = ("model-00001-of-00003.safetensors",
                                                                      torch.full((3,), 7.0))
    _write_all(folder, entries)
    loaded = load_hf(folder, dtype=torch.float32, progress=False)
    assert torch.equal(loaded(_ids()), _model()(_ids()))


def test_missing_shard_names_the_file(folder):
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim.name)):
        load_hf(folder, progress=False)


def test_wrong_shape_names_tensor_and_file(folder):
    entries = _read_all(folder)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    file, t = entries[name]
    entries[name] = (file, t.T)
    _write_all(folder, entries)
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        load_hf(folder, progress=False)
    assert file in str(err.value)


def test_missing_tensor_is_named(folder):
    entries = _read_all(folder)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    del entries[name]
    _write_all(folder, entries)
    with pytest.raises(KeyError, match=re.escape(name)):
        load_hf(folder, progress=False)


def test_unsupported_architecture(folder):
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, "model_type": "llama",
                                                    "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="llama"):
        load_hf(folder, progress=False)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelConfig.from_hf_dict({**hf, "architectures": ["LlamaForCausalLM"]})


# --- config.json ---------------------------------------------------------------------------------
K2_YARN = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
           "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

# K2-Instruct (July 2025) config.json, K2-SPEC §1
K2_JULY = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "num_hidden_layers": 61,
    "first_k_dense_replace": 1, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.827, "aux_loss_alpha": 0.001, "seq_aux": True, "num_attention_heads": 64,
    "num_key_value_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0, "max_position_embeddings": 131072, "num_nextn_predict_layers": 0,
    "bos_token_id": 163584, "eos_token_id": 163585, "tie_word_embeddings": False, "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3", "use_cache": True, "rope_scaling": K2_YARN,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_k2_july_config_round_trip(tmp_path):
    cfg = ModelConfig.from_hf_dict(K2_JULY)
    assert dataclasses.replace(cfg, extra={}) == KIMI_K2  # the preset is the shipped config
    assert abs(cfg.softmax_scale - 0.1308608) < 1e-7  # K2-SPEC §3.5
    assert {"auto_map", "aux_loss_alpha", "seq_aux", "quantization_config"} <= set(cfg.extra)
    assert not set(cfg.extra) & {f.name for f in dataclasses.fields(ModelConfig)}
    out = cfg.to_hf_dict()
    assert {k: out[k] for k in K2_JULY} == K2_JULY
    assert set(out) - set(K2_JULY) <= {"pad_token_id"} and out.get("pad_token_id") is None
    cfg.save_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg


def test_rope_parameters_and_rope_scaling_read_the_same():
    base = {k: v for k, v in K2_JULY.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v4 = {**base, "rope_theta": 50000.0, "rope_scaling": K2_YARN, "torch_dtype": "bfloat16"}
    v4_rope_type = {**v4, "rope_scaling": {"rope_type": "yarn", **{k: v for k, v in K2_YARN.items() if k != "type"}}}
    v5 = {**base, "dtype": "bfloat16",
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0,
                              **{k: v for k, v in K2_YARN.items() if k != "type"}}}
    a, b, c = (ModelConfig.from_hf_dict(d) for d in (v4, v4_rope_type, v5))
    assert a == b == c
    assert a.rope_theta == 50000.0 and a.rope_scaling == K2_YARN and a.torch_dtype == "bfloat16"
    assert abs(c.softmax_scale - 0.1308608) < 1e-7

    plain = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert abs(plain.softmax_scale - 192 ** -0.5) < 1e-9


def test_model_types_and_unknown_keys():
    k2 = ModelConfig.from_hf_dict({**K2_JULY, "model_type": "kimi_k2", "future_field": {"a": [1, 2]}})
    ds = ModelConfig.from_hf_dict({**K2_JULY, "model_type": "deepseek_v3"})
    assert k2.model_type == "kimi_k2" and ds.model_type == "deepseek_v3"
    assert k2.extra["future_field"] == {"a": [1, 2]} and "future_field" not in ds.extra
    assert "hidden_size" not in k2.extra  # known keys become fields
    out = k2.to_hf_dict()
    assert out["future_field"] == {"a": [1, 2]} and out["model_type"] == "kimi_k2"
    assert ModelConfig.from_hf_dict(out) == k2
    with pytest.raises(ValueError, match="llama"):
        ModelConfig.from_hf_dict({**K2_JULY, "model_type": "llama"})


def test_cli_refuses_folders_without_weights_and_names_damaged_files(tmp_path):
    """No random weights in place of a checkpoint; a truncated shard and a bad config.json each give one
    line naming the file (not a traceback)."""
    from openk2.cli import main
    from openk2.config import PRESETS
    from openk2.model import build_model

    folder = save_hf(build_model(PRESETS["k2-tiny"]), tmp_path / "ckpt", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "bad.json").write_text("{not json")
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for spec, message in [(tmp_path / "empty", "holds no *.safetensors weights"),
                          (folder, f"{shard}: not a readable safetensors file"),
                          (tmp_path / "bad.json", f"{tmp_path / 'bad.json'}: not a model config")]:
        with pytest.raises(SystemExit) as e:
            main(["generate", str(spec), "--prompt-ids", "1"])
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
