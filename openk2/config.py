"""ModelConfig: the K2 / DeepSeek-V3 family architecture as one flat dataclass.

Field names are `config.json`'s. `from_hf_dict` / `to_hf_dict` are the only places that know HF's
spellings (transformers 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`, `model_type`
`kimi_k2` or `deepseek_v3`); unknown keys ride along in `extra` and are written back unchanged.
Presets are derived from `kimi-k2` with `dataclasses.replace`, never re-spelled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 61
    # MLA
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536  # None: a single q_proj (Moonlight, DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int | None = 384  # None: every layer dense
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"  # the DeepSeek-V3 family's only method
    scoring_func: str = "sigmoid"  # sigmoid (K2, V3) | softmax
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    # positions
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    max_position_embeddings: int = 131072
    # the rest
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # MTP blocks: skipped on load, not part of the model
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = None
    model_type: str = "kimi_k2"
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, kept verbatim

    def __post_init__(self):
        # own copies: presets derived by dataclasses.replace must not share mutable dicts
        object.__setattr__(self, "extra", dict(self.extra))
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rs.setdefault("original_max_position_embeddings", self.max_position_embeddings)  # as transformers
            object.__setattr__(self, "rope_scaling", rs)
        problems = []
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} (only 'silu' / SwiGLU)")
        if self.scoring_func not in ("sigmoid", "softmax"):
            problems.append(f"scoring_func={self.scoring_func!r} (sigmoid or softmax)")
        if self.topk_method != "noaux_tc":
            problems.append(f"topk_method={self.topk_method!r} (only noaux_tc)")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                problems.append(f"n_routed_experts={self.n_routed_experts} not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group={self.topk_group} outside 1..n_group={self.n_group}")
            if self.num_experts_per_tok > self.n_routed_experts:
                problems.append(f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.rope_scaling and self.rope_type not in ("yarn", "default"):
            problems.append(f"rope_scaling type {self.rope_type!r} (only yarn)")
        if self.rope_type == "yarn" and not self.rope_scaling.get("factor"):
            problems.append("yarn rope_scaling without a factor")
        if problems:
            raise ValueError("unsupported model config: " + "; ".join(problems))

    # --- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("type", rs.get("rope_type", "default"))

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def softmax_scale(self) -> float:
        """192^-0.5 · m², m = 0.1·mscale_all_dim·ln(factor) + 1 (K2-SPEC §3.5; as HF: whenever yarn is set)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if self.rope_type == "yarn" and rs.get("mscale_all_dim") and rs["factor"] > 1:
            m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
            scale *= m * m
        return scale

    # --- config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        archs = d.get("architectures") or list(SUPPORTED_ARCHITECTURES)
        if model_type not in SUPPORTED_MODEL_TYPES or not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; openk2 reads "
                f"model_type {SUPPORTED_MODEL_TYPES} with architectures {SUPPORTED_ARCHITECTURES}")
        if d.get("num_key_value_heads", d.get("num_attention_heads")) != d.get("num_attention_heads"):
            raise ValueError("unsupported: num_key_value_heads != num_attention_heads (MLA has one KV per head)")
        rope_params = d.pop("rope_parameters", None)  # transformers 5.x
        if rope_params is not None:
            rope_params = dict(rope_params)
            d.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            kind = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope_params}
        elif d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            rs["type"] = rs.pop("rope_type", rs.get("type", "default"))
            d["rope_scaling"] = None if rs["type"] == "default" else rs
        if "rope_theta" not in d:
            d["rope_theta"] = 10000.0  # transformers' DeepseekV3Config default
        if d.get("torch_dtype") is None and d.get("dtype") is not None:
            d["torch_dtype"] = d.pop("dtype")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        # ours defaults are K2's; a config.json that omits a field means the HF class default instead
        for k, hf_default in _HF_DEFAULTS.items():
            known.setdefault(k, hf_default)
        return cls(**known, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d}
        d.setdefault("architectures", list(SUPPORTED_ARCHITECTURES))
        d.setdefault("num_key_value_heads", self.num_attention_heads)
        d.setdefault("attention_bias", False)
        d.setdefault("attention_dropout", 0.0)
        d.setdefault("use_cache", True)
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            return cls.from_hf_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}: not a model config ({type(e).__name__}: {e})") from None

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


# DeepseekV3Config defaults (transformers) for fields a config.json may leave out.
_HF_DEFAULTS: dict[str, Any] = {
    "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "num_attention_heads": 128, "rope_scaling": None, "num_nextn_predict_layers": 0,
    "vocab_size": 129280, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
    "model_type": "deepseek_v3",
}

# --- presets -----------------------------------------------------------------------------------
KIMI_K2 = ModelConfig()  # July 2025 K2-Instruct config.json (K2-SPEC §1)

PRESETS: dict[str, ModelConfig] = {
    "kimi-k2": KIMI_K2,
    "kimi-k2-0905": dataclasses.replace(
        KIMI_K2, rope_scaling={**KIMI_K2.rope_scaling, "factor": 64.0}, max_position_embeddings=262144,
        eos_token_id=163586, pad_token_id=163839, rms_norm_eps=1e-5),
    # Moonlight-16B-A3B: DeepSeek-V3 family, q_lora_rank null, 64 experts top-6, 2 shared, no yarn
    "moonlight-16b-a3b": dataclasses.replace(
        KIMI_K2, model_type="deepseek_v3", hidden_size=2048, intermediate_size=11264, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1408, routed_scaling_factor=2.446,
        rope_scaling=None, max_position_embeddings=8192, eos_token_id=163584, bos_token_id=163584),
}
# CPU presets: K2's shape (MLA with q latent, 1 dense layer, fine-grained experts, top-k + 1 shared).
PRESETS["k2-small"] = dataclasses.replace(  # the peers' 143M toy: hidden 512, 6 layers, 64 experts top-8
    KIMI_K2, vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
    num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=64, moe_intermediate_size=256, max_position_embeddings=4096,
    rope_scaling={**KIMI_K2.rope_scaling, "factor": 4.0, "original_max_position_embeddings": 1024},
    bos_token_id=7936, eos_token_id=7937, torch_dtype="float32",
    model_type="deepseek_v3")  # transformers loads deepseek_v3 folders natively; kimi_k2 needs remote code
PRESETS["k2-mini"] = dataclasses.replace(  # the demo pretraining model: minutes on 2 CPU cores
    PRESETS["k2-small"], vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
    max_position_embeddings=1024, rope_scaling={**KIMI_K2.rope_scaling, "factor": 4.0,
                                                "original_max_position_embeddings": 256},
    bos_token_id=3840, eos_token_id=3841)
PRESETS["k2-tiny"] = dataclasses.replace(  # unit tests: every code path in milliseconds
    PRESETS["k2-small"], vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
    max_position_embeddings=512, rope_scaling={**KIMI_K2.rope_scaling, "factor": 4.0,
                                               "original_max_position_embeddings": 128},
    bos_token_id=256, eos_token_id=257)


def resolve_config(spec: str | Path | ModelConfig) -> ModelConfig:
    """A preset name, a config.json, or a Hugging Face folder holding one."""
    if isinstance(spec, ModelConfig):
        return spec
    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if path.exists():
        return ModelConfig.from_json(path)
    raise ValueError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model folder")
