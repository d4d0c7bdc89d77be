"""Parameter, cache and FLOP arithmetic of a config, from the formulas of K2-SPEC §2.

Pure arithmetic on ModelConfig (no model is built); tests/test_info.py checks it against the
parameters of a `meta`-device model and against K2's published totals.
"""

import os
from dataclasses import dataclass

from openk2.config import ModelConfig


def attention_params(cfg: ModelConfig, with_norms: bool = True) -> int:
    D, H, C, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim if cfg.q_lora_rank
         else D * H * cfg.qk_head_dim)
    kv = D * (C + R) + C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    norms = (cfg.q_lora_rank or 0) + C
    return q + kv + H * cfg.v_head_dim * D + (norms if with_norms else 0)


def expert_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


@dataclass
class Breakdown:
    embed: int
    lm_head: int
    attention: int  # all layers, incl. q_a/kv_a norms
    layer_norms: int  # input + post-attention of all layers, + final norm
    dense_mlp: int
    routed_experts: int
    shared_experts: int
    router: int  # gate weight + correction bias
    active_per_token: int  # incl. embedding row and lm_head
    active_linear: int  # matmul weights a token touches: lm_head, attention, dense, K+shared experts, gate

    @property
    def total(self) -> int:
        return (self.embed + self.lm_head + self.attention + self.layer_norms + self.dense_mlp
                + self.routed_experts + self.shared_experts + self.router)

    @property
    def active_no_embed(self) -> int:
        return self.active_per_token - self.embed


def breakdown(cfg: ModelConfig) -> Breakdown:
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    n_dense, E = L - n_moe, cfg.n_routed_experts or 0
    expert = expert_params(cfg)
    attn = attention_params(cfg)
    dense = 3 * D * cfg.intermediate_size
    lm_head = 0 if cfg.tie_word_embeddings else V * D
    b = Breakdown(
        embed=V * D, lm_head=lm_head, attention=L * attn, layer_norms=(2 * L + 1) * D,
        dense_mlp=n_dense * dense, routed_experts=n_moe * E * expert,
        shared_experts=n_moe * cfg.n_shared_experts * expert, router=n_moe * (E * D + E),
        active_per_token=0, active_linear=0)
    moe_active = (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert
    b.active_per_token = (b.embed + b.lm_head + b.attention + b.layer_norms + b.dense_mlp
                          + n_moe * (moe_active + E * D + E))
    b.active_linear = (V * D + L * attention_params(cfg, with_norms=False) + b.dense_mlp
                       + n_moe * (moe_active + E * D))
    return b


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """The latent cache: C-d normalised latent + R-d rotary key per token per layer."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * bytes_per_value


def flops_per_token(cfg: ModelConfig, context: int) -> int:
    """Forward FLOPs of one token at position `context`: 2·(active linear weights) + attention.

    Attention (absorbed form, what decode runs): per layer and head, scores against `context`
    latents of width C + R and values of width C: 2·H·(2C + R)·context.
    """
    attn = 2 * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context
    return 2 * breakdown(cfg).active_linear + cfg.num_hidden_layers * attn


def report(cfg: ModelConfig, name: str = "") -> str:
    b = breakdown(cfg)
    kv = kv_cache_bytes_per_token(cfg)
    rows = [
        ("total parameters", b.total),
        ("  embed_tokens", b.embed), ("  lm_head", b.lm_head),
        ("  attention (all layers)", b.attention),
        ("  attention per layer", attention_params(cfg)),
        ("  dense MLP", b.dense_mlp), ("  routed experts", b.routed_experts),
        ("  routed share of total", f"{100 * b.routed_experts / b.total:.1f}%"),
        ("  shared experts", b.shared_experts), ("  routers (gate + bias)", b.router),
        ("  norms", b.layer_norms),
        ("active per token (incl. embedding, lm_head)", b.active_per_token),
        ("active per token (excl. input embedding)", b.active_no_embed),
        ("active linear weights per token", b.active_linear),
        ("latent KV cache bytes / token (bf16)", kv),
        ("latent KV cache bytes, 131,072 tokens", kv * 131072),
        ("forward FLOPs / token at position 0", flops_per_token(cfg, 0)),
        ("forward FLOPs / token at position 4,096", flops_per_token(cfg, 4096)),
    ]
    width = max(len(r[0]) for r in rows)
    head = (f"{name or cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads, {cfg.n_routed_experts or 0} experts "
            f"(top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared), vocab {cfg.vocab_size}")
    lines = [head] + [f"{k:<{width}}  {v if isinstance(v, str) else f'{v:,}':>20}" for k, v in rows]
    return "\n".join(lines)


def available_bytes() -> int:
    """Memory the OS can give now (MemAvailable: free + reclaimable cache)."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs of one training token (3× forward), attention in the materialised
    form training runs: QKᵀ and PV over the causal average of seq_len / 2 keys, 2·H·(A + O) per key."""
    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len // 2)
    return 3 * (2 * breakdown(cfg).active_linear + cfg.num_hidden_layers * attn)



def require_memory(need: int, what: str, hint: str = "") -> None:
    """A clear ValueError, before any work, when `need` bytes exceed 90% of the available memory."""
    avail = available_bytes()
    if need > 0.9 * avail:
        raise ValueError(f"{what} needs ~{need / 2**30:,.1f} GiB, the machine has {avail / 2**30:,.1f} GiB "
                         f"available{hint}")


def check_memory(cfg, dtype) -> None:
    """Refuse a model whose weights cannot fit in this machine's available memory."""
    require_memory(breakdown(cfg).total * dtype.itemsize, f"this model in {str(dtype).removeprefix('torch.')}")
