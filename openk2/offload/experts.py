"""A model whose routed experts stay on disk: `load_offloaded` and the module that stands in for them.

`OffloadedExperts` is a drop-in for `openk2.model.moe.Experts` (as `QuantizedExperts` is): the MoE
layer routes as always and hands it the rows sorted by expert; it asks the shared `ExpertCache` for
the experts used (reading the missing ones from disk) and runs each one's SwiGLU on its rows with the
same calls as `Experts`' CPU path, on weights equal to those `load_hf` would load: the logits equal the
fully resident model's bit for bit (tests/test_offload.py). Quantized to int4 (`quantize_experts`),
the cache holds `Int4Experts`' codes and scales and the calls are `Int4Experts`' (equal to the
resident model quantized the same way). Its decode face is None: the compiled
decode step indexes every expert as one tensor, which experts on disk are not, so the engine decodes
these models eagerly (see `decode_weights` below).

    M (token, expert) pairs sorted by expert  N tokens  D hidden  E experts  K per token
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from openk2.checkpoint.hf import load_dtype, load_hf
from openk2.config import ModelConfig
from openk2.info import check_memory
from openk2.model.linear import experts_kernel
from openk2.model.moe import kernel_swiglu
from openk2.offload.cache import ExpertCache, expert_bytes
from openk2.offload.store import ExpertStore


class OffloadedExperts(nn.Module):
    """Layer `layer`'s routed experts, fetched through `cache` when used."""

    # The compiled decode step reads experts as one stacked tensor indexed by expert id; these live in
    # cache slots filled on demand (a read between routing and the experts' matmuls), so the engine's
    # face check (`openk2.engine.decode.compilable`) keeps such a model on the eager step.
    decode_weights = None

    def __init__(self, layer: int, cache: ExpertCache):
        super().__init__()
        self.layer, self.cache = layer, cache

    def extra_repr(self) -> str:
        return f"layer={self.layer}, cache={self.cache.slots} experts"

    def quantize_experts(self, mode: str) -> None:
        """`quantize_model(model, mode)` for experts on disk. int4: the cache holds them as `Int4Experts`
        would (the same codes and scales, so the same logits), ~3.6× as many in the same bytes. int8:
        they stay in the load dtype (an int8 cache would hold only 1.8× as many; int8 quantizes the
        other linears)."""
        if mode == "int4":
            self.cache.to_format("int4")

    def _fetched(self, used: list[int]):
        """(experts, their cache slots) for the used experts, at most a cache-full at a time."""
        for i in range(0, len(used), self.cache.slots):
            group = used[i:i + self.cache.slots]
            yield group, self.cache.fetch(self.layer, group)

    def _runs(self, used: list[int], dtype: torch.dtype):
        """(expert, gate_up [2F, D], down [D, F]) in `dtype` for each used expert."""
        for group, slots in self._fetched(used):
            for e, slot in zip(group, slots):
                yield e, *self.cache.weights(slot, dtype)

    def forward(self, x_MD, counts_E, w_M, grouped: bool | None = None):
        """Rows of x_MD sorted by expert (counts_E[e] rows each), each scaled by its weight w_M."""
        if grouped:
            raise NotImplementedError("offloaded experts have no grouped kernel; pass grouped=None/False")
        counts = counts_E.tolist()
        starts = [0, *itertools.accumulate(counts)]
        out, used = {}, [e for e, n in enumerate(counts) if n]
        kernel = experts_kernel(x_MD, len(used), self.cache.gate_up_S2FD, self.cache.gate_up_scale,  # as resident
                                self.cache.down_SDF, self.cache.down_scale)
        if kernel is not None:
            for group, slots in self._fetched(used):  # the kernel over the cache's slots
                idx_M = torch.cat([torch.full((counts[e],), s, device=x_MD.device) for e, s in zip(group, slots)])
                x = torch.cat([x_MD[starts[e]:starts[e + 1]] for e in group])
                y = kernel_swiglu(kernel, x, idx_M, self.cache.gate_up_S2FD, self.cache.gate_up_scale,
                                  self.cache.down_SDF, self.cache.down_scale)
                out |= dict(zip(group, y.split([counts[e] for e in group])))
        else:
            for e, w_gate_up, w_down in self._runs(used, x_MD.dtype):
                gate, up = F.linear(x_MD[starts[e]:starts[e + 1]], w_gate_up).chunk(2, dim=-1)
                out[e] = F.linear(F.silu(gate).mul_(up), w_down)
        return torch.cat([out[e] for e in sorted(out)]).mul_(w_M[:, None])

    def forward_reference(self, x_ND, topk_idx_NK, topk_w_NK):
        """The routing reference (as `Experts.forward_reference`), over the cached weights."""
        out_ND = torch.zeros_like(x_ND)
        F_ = self.cache.store.cfg.moe_intermediate_size
        for e, w_gate_up, w_down in self._runs(torch.unique(topk_idx_NK).tolist(), x_ND.dtype):
            tok, slot = torch.where(topk_idx_NK == e)
            x = x_ND[tok]
            y = (F.silu(x @ w_gate_up[:F_].T) * (x @ w_gate_up[F_:].T)) @ w_down.T
            out_ND.index_add_(0, tok, y * topk_w_NK[tok, slot, None].to(y.dtype))
        return out_ND


def cache_slots(cfg: ModelConfig, cache_bytes: int, dtype: torch.dtype) -> int:
    """How many experts `cache_bytes` hold (never more than the model has)."""
    n_moe = cfg.n_moe_layers
    return min(int(cache_bytes // expert_bytes(cfg, dtype)), n_moe * cfg.n_routed_experts)


PREFETCH_ROWS = 8  # decode steps of up to this many tokens prefetch; a prompt's chunk uses most experts anyway


def add_prefetch(model, cache: ExpertCache) -> None:
    """Before each MoE layer runs, guess the next MoE layer's experts by applying its router to this
    layer's input (the residual stream changes little from one layer to the next) and start reading
    the missing ones, so that they load while this layer reads and computes. The guess only
    schedules reads: routing itself is untouched, so the logits are the same with or without it.

    Off by default: measured on a 42.6 GB model here (bench/offload.py), it reads ~60 % of the misses
    ahead but 25-55 % more bytes per token (wrong guesses), for no decode speed beyond the run-to-run
    noise: the reads of two layers in flight share one disk."""
    moes = [(i, layer.mlp) for i, layer in enumerate(model.layers)
            if isinstance(getattr(layer.mlp, "experts", None), OffloadedExperts)]
    for (i, moe), (j, nxt) in zip(moes, moes[1:]):
        def guess(module, args, i=i, j=j, moe=moe, nxt=nxt):
            x_ND = args[0].reshape(-1, args[0].shape[-1])
            if x_ND.shape[0] <= PREFETCH_ROWS:
                keep = {(i, e) for e in moe.gate(x_ND)[0].unique().tolist()}  # this layer's own: never evicted
                cache.prefetch(j, nxt.gate(x_ND)[0].unique().tolist(), keep)
        moe.register_forward_pre_hook(guess)


def load_offloaded(path, cache_bytes: int, dtype: torch.dtype | None = None, device="cpu",
                   policy: str = "lru", progress: bool = True, prefetch: bool = False):
    """A model from a HF folder with everything resident but the routed experts, which are read from
    the folder's files into one cache of `cache_bytes` shared by all layers (`prefetch`: see
    `add_prefetch`). The cache is the model's `expert_cache` (its `stats()` for the CLI and `/metrics`)."""
    cfg = ModelConfig.from_json(path)
    if not cfg.n_routed_experts:
        raise ValueError(f"{path}: the model has no routed experts to offload")
    dtype = load_dtype(cfg, dtype)
    check_memory(cfg, dtype, cache_bytes / 1e9)
    cache = ExpertCache(ExpertStore(path, cfg), cache_slots(cfg, cache_bytes, dtype), dtype, device, policy)
    model = load_hf(path, dtype, device, progress, experts=lambda i: OffloadedExperts(i, cache))
    model.expert_cache = cache
    if prefetch:
        add_prefetch(model, cache)
    return model
