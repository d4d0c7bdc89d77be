"""Parameter arithmetic: K2's published numbers, and the formulas against a meta-device model."""

import dataclasses

import pytest
import torch

from openk2.cli import main
from openk2.config import PRESETS
from openk2.info import attention_params, breakdown, expert_params, kv_cache_bytes_per_token
from openk2.model import Transformer, count_params

K2 = PRESETS["kimi-k2"]


def test_kimi_k2_exact_numbers():
    b = breakdown(K2)
    assert b.total == 1_026_408_232_448
    assert attention_params(K2) == 101_124_096
    assert expert_params(K2) == 44_040_192
    assert b.dense_mlp == 396_361_728
    assert b.routed_experts == 1_014_686_023_680
    assert b.active_per_token == 32_861_500_928
    assert b.active_no_embed == 31_687_095_808
    assert b.active_linear == 31_686_066_176
    assert kv_cache_bytes_per_token(K2) == 70_272
    assert kv_cache_bytes_per_token(K2) * 131_072 == 9_210_691_584


@pytest.mark.parametrize("name", ["kimi-k2", "moonlight-16b-a3b", "k2-small", "k2-tiny"])
def test_formula_equals_meta_model(name):
    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    assert breakdown(PRESETS[name]).total == count_params(model)


def test_formula_for_family_variants():
    variants = [
        dataclasses.replace(PRESETS["k2-tiny"], n_group=4, topk_group=2, n_shared_experts=0),
        dataclasses.replace(PRESETS["k2-tiny"], q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=2),
        dataclasses.replace(PRESETS["k2-tiny"], moe_layer_freq=2, tie_word_embeddings=True),
        dataclasses.replace(PRESETS["k2-tiny"], n_routed_experts=None),
    ]
    for cfg in variants:
        with torch.device("meta"):
            model = Transformer(cfg)
        assert breakdown(cfg).total == count_params(model), cfg


def test_active_params_are_total_minus_unused_experts():
    """Active = everything but the routed experts a token does not visit."""
    cfg = PRESETS["k2-tiny"]
    b = breakdown(cfg)
    per_moe_layer_unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert_params(cfg)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert b.active_per_token == b.total - n_moe * per_moe_layer_unused


def test_cli_info_prints_k2_numbers(capsys):
    main(["info", "kimi-k2"])
    out = capsys.readouterr().out
    for number in ["1,026,408,232,448", "101,124,096", "32,861,500,928", "70,272", "9,210,691,584"]:
        assert number in out
