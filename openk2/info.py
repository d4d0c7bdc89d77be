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


INT4_GROUP = 32  # values per bf16 scale: K2-Thinking's INT4 checkpoints, our int4 (openk2.quant) and its cache


def expert_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def expert_bytes(cfg: ModelConfig, itemsize: int = 2, fmt: str = "float") -> int:
    """One routed expert's weights (gate, up and down) at `itemsize` bytes a value, or as int4 codes
    (two a byte) with an `itemsize` scale per INT4_GROUP values."""
    n = expert_params(cfg)
    return n * itemsize if fmt == "float" else n // 2 + n // INT4_GROUP * itemsize


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
    n_moe = cfg.n_moe_layers
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


def check_memory(cfg, dtype, expert_cache_gb: float | None = None) -> None:
    """Refuse a model whose weights cannot fit in this machine's available memory (with an expert
    cache: the resident weights and the cache)."""
    name = str(dtype).removeprefix("torch.")
    if expert_cache_gb is None:
        require_memory(breakdown(cfg).total * dtype.itemsize, f"this model in {name}")
    else:
        need = resident_bytes(cfg, dtype.itemsize) + int(expert_cache_gb * 1e9)
        require_memory(need, f"this model in {name} with a {expert_cache_gb:g} GB expert cache",
                       " (give a smaller --expert-cache)")


# --- expert offload (openk2.offload): what stays in memory, what is read from disk ---------------
# bytes per routed-expert weight on disk: plain bf16; FP8 with an fp32 scale per 128×128 tile (as
# K2-Instruct); INT4 with a bf16 scale per 32 (as K2-Thinking). In memory every format is bf16: the
# loader dequantises, and the cache holds what the model multiplies with.
DISK_BYTES = {"bf16": 2.0, "fp8": 1 + 4 / 128**2, "int4": 0.5 + 2 / INT4_GROUP}
RAM_SIZES_GB = (64, 128, 256, 512)


def resident_bytes(cfg: ModelConfig, itemsize: int = 2) -> int:
    """Memory of everything but the routed experts (the routers in fp32)."""
    b = breakdown(cfg)
    return (b.total - b.routed_experts - b.router) * itemsize + 4 * b.router


def offload_report(cfg: ModelConfig, cache_gb: float, name: str = "") -> str:
    """The memory split of `cfg` served with routed experts on disk behind a `cache_gb` cache."""
    b, K = breakdown(cfg), cfg.num_experts_per_tok
    n_moe = cfg.n_moe_layers
    n_experts, per = n_moe * (cfg.n_routed_experts or 0), 2 * expert_params(cfg)
    if not n_experts:
        return f"{name or cfg.model_type}: no routed experts to offload"
    resident = resident_bytes(cfg)
    slots = min(n_experts, int(cache_gb * 1e9 // per))
    gb = lambda n: f"{n / 1e9:,.2f} GB"  # noqa: E731
    # an int4 cache: the bytes of the bf16 experts it was given (as ExpertCache.to_format), in int4 ones
    held4 = lambda nbytes: max(0, min(n_experts, int(nbytes // per * per // expert_bytes(cfg, 2, "int4"))))  # noqa: E731
    lines = [f"{name or cfg.model_type} with --expert-cache {cache_gb:g} (weights in memory as bf16):",
             f"  resident (all but the routed experts)  {gb(resident)}",
             f"  routed experts                         {n_experts:,} of {per / 1e6:,.1f} MB each = "
             f"{gb(n_experts * per)}",
             f"  the cache holds                        {slots:,} experts ({100 * slots / n_experts:.1f} %); "
             f"the least that works: one layer's top-{K}, {gb(K * per)}",
             f"  with --quantize int4 it holds          {held4(cache_gb * 1e9):,} experts as int4 codes and bf16 "
             f"scales ({100 * held4(cache_gb * 1e9) / n_experts:.1f} %)",
             f"  in memory: resident + cache            {gb(resident + slots * per)}",
             "  format of the routed experts (the rest bf16) | on disk | read per token if every expert misses"]
    for fmt, nbytes in DISK_BYTES.items():
        disk = (b.total - b.routed_experts) * 2 + b.routed_experts * nbytes
        lines.append(f"  {fmt:<6} | {gb(disk)} | {gb(n_moe * K * nbytes * expert_params(cfg))}")
    lines.append("  RAM | fully resident (bf16) | largest cache (RAM - resident - 10 %) | experts cached | as int4")
    for ram in RAM_SIZES_GB:
        cache = 0.9 * ram * 1e9 - resident
        fits = "yes" if b.total * 2 <= 0.9 * ram * 1e9 else "no"
        held = max(0, min(n_experts, int(cache // per)))
        usable = "too small" if held < K else f"{held:,} ({100 * held / n_experts:.1f} %)"
        usable4 = "too small" if held4(cache) < K else f"{held4(cache):,} ({100 * held4(cache) / n_experts:.1f} %)"
        lines.append(f"  {ram} GB | {fits} | {gb(max(cache, 0))} | {usable} | {usable4}")
    return "\n".join(lines)
