"""Parity with transformers' DeepseekV3ForCausalLM on random tiny configs of the K2 family.

Both directions go through a checkpoint folder: HF `save_pretrained` -> `openk2.checkpoint.load_hf`,
and openk2 `save_hf` -> HF `from_pretrained`. fp32 logits must agree within 1e-4 at every valid
position of a right-padded batch (lengths 5, 17, 32), on the materialised and absorbed MLA paths.

Random init, not HF's: HF initialises RMSNorm weights to 1, the router bias to 0 and every
linear with std 0.02, so on hidden 32 the router logits sit near 0 and the bias would be the only
thing choosing experts, and a swapped norm could not show. Here every tensor is re-drawn
(norms 1 + N(0, 0.1), router N(0, 0.5), bias N(0, 0.1)) and a guard checks the bias changes logits.
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # a [dev] dependency
DeepseekV3Config, DeepseekV3ForCausalLM = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM

from openk2.checkpoint import load_hf, save_hf
from openk2.config import KIMI_K2, ModelConfig
from openk2.model import build_model

TOL = 1e-4
LENGTHS = (5, 17, 32)

_TINY = dict(vocab_size=160, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
             num_nextn_predict_layers=0, tie_word_embeddings=False)

HF_CONFIGS = {
    # (a) K2's shape: yarn beta 1/1, sigmoid noaux_tc without groups, q latent, 1 shared expert
    "k2": dict(_TINY, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
               n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
               rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                "original_max_position_embeddings": 8, "beta_fast": 1.0, "beta_slow": 1.0,
                                "mscale": 1.0, "mscale_all_dim": 1.0}),
    # (b) Moonlight-like: a single q_proj, 2 shared experts, plain rope
    "moonlight": dict(_TINY, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                      n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.446,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    # (c) DeepSeek-V3-like: group-limited routing (4 groups, keep 2), yarn beta 32/1, 2 dense layers
    "grouped": dict(_TINY, q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                    n_group=4, topk_group=2, first_k_dense_replace=2, routed_scaling_factor=2.5,
                    num_hidden_layers=4, rms_norm_eps=1e-5, max_position_embeddings=640,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                     "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _redraw_(named_params, named_buffers, seed: int):
    """Non-trivial weights (see module docstring); works on HF and openk2 names alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in named_buffers:
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _hf_model(kind: str, seed: int = 0) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**HF_CONFIGS[kind])).eval()
    _redraw_(model.named_parameters(), model.named_buffers(), seed)
    return model


def _batch(vocab: int, seed: int = 1):
    """Right-padded ids [3, 32] (pad id 0) and the attention mask of lengths 5, 17, 32."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _max_diff_valid(a, b, mask) -> float:
    return max((a[i, :n] - b[i, :n]).abs().max().item() for i, n in enumerate(mask.sum(1).tolist()))


@torch.no_grad()
def _hf_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
@torch.no_grad()
def test_hf_to_openk2_logits(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, dtype=torch.float32, progress=False).eval()
    ids, mask = _batch(hf.config.vocab_size)
    ref = _hf_logits(hf, ids, mask)
    assert ref.std() > 0.1, "logits too flat for a 1e-4 comparison to mean anything"

    got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert _max_diff_valid(got, ref, mask) <= TOL
    assert _max_diff_valid(ours(ids, absorb=True), ref, mask) <= TOL
    assert _max_diff_valid(ours(ids, reference=True), ref, mask) <= TOL

    # guard: the router bias steers selection in this config, so parity above tested it
    for layer in ours.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.zero_()
    assert _max_diff_valid(ours(ids), ref, mask) > 1e-3


def test_config_read_from_transformers_matches():
    """The ModelConfig openk2 reads from a transformers 5.x config.json has the family's fields."""
    hf_cfg = DeepseekV3Config(**HF_CONFIGS["k2"])
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling == {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 8,
                                "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert (cfg.q_lora_rank, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group) == (24, 8, 3, 1)
    assert cfg.routed_scaling_factor == 2.827 and cfg.num_nextn_predict_layers == 0
    moon = ModelConfig.from_hf_dict(DeepseekV3Config(**HF_CONFIGS["moonlight"]).to_dict())
    assert moon.q_lora_rank is None and moon.rope_scaling is None and moon.n_shared_experts == 2


def _openk2_model(cfg: ModelConfig, seed: int = 0):
    model = build_model(cfg, dtype=torch.float32, seed=seed).eval()
    _redraw_(model.named_parameters(), model.named_buffers(), seed + 100)
    return model


def _hf_from_folder(path) -> DeepseekV3ForCausalLM:
    # transformers picks its per-expert <-> fused-expert key conversion by config.model_type, and it
    # has none for "kimi_k2" (K2 itself ships remote code): read the config, call it deepseek_v3
    hf_cfg = DeepseekV3Config.from_pretrained(path)
    hf_cfg = DeepseekV3Config.from_dict({**hf_cfg.to_dict(), "model_type": "deepseek_v3"})
    model, info = DeepseekV3ForCausalLM.from_pretrained(path, config=hf_cfg, dtype=torch.float32,
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
@torch.no_grad()
def test_openk2_to_hf_logits(kind, tmp_path):
    cfg = ModelConfig.from_hf_dict(DeepseekV3Config(**HF_CONFIGS[kind]).to_dict())
    ours = _openk2_model(cfg)
    save_hf(ours, tmp_path, progress=False)
    hf = _hf_from_folder(tmp_path)
    ids, mask = _batch(cfg.vocab_size, seed=2)
    ref = ours(ids)
    assert ref.std() > 0.1
    assert _max_diff_valid(_hf_logits(hf, ids, mask), ref, mask) <= TOL


# K2's own config.json spelling (model_type kimi_k2, 4.x rope_theta + rope_scaling), tiny sizes
K2_TINY = dataclasses.replace(
    KIMI_K2, vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    rope_scaling={**KIMI_K2.rope_scaling, "original_max_position_embeddings": 8})


@torch.no_grad()
def test_kimi_k2_sharded_folder_loads_in_transformers(tmp_path):
    ours = _openk2_model(K2_TINY, seed=3)
    save_hf(ours, tmp_path, max_shard_bytes=20_000, progress=False)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "kimi_k2"

    hf = _hf_from_folder(tmp_path)
    assert hf.config.rope_parameters["rope_type"] == "yarn"  # yarn must survive the 4.x spelling
    assert hf.config.rope_parameters["rope_theta"] == 50000.0
    ids, mask = _batch(K2_TINY.vocab_size, seed=4)
    ref = ours(ids)
    assert _max_diff_valid(_hf_logits(hf, ids, mask), ref, mask) <= TOL
    # and back: the HF model's own save loads in openk2 to the same logits
    hf.save_pretrained(tmp_path / "again")
    back = load_hf(tmp_path / "again", dtype=torch.float32, progress=False)
    assert _max_diff_valid(back(ids, absorb=True), ref, mask) <= TOL
