"""A bounded cache of routed experts in memory, filled from an `ExpertStore` when the router picks them.

`ExpertCache` holds `slots` experts of every layer in two stacked tensors (gate_up [S, 2F, D] and
down [S, D, F], allocated once: the cache never grows), on the CPU or a GPU, and evicts by LRU or
LFU. It counts hits, misses, bytes read and the seconds decoding waited on reads (`stats`).

In the int4 format (`to_format("int4")`, what `quantize_model(model, "int4")` asks of offloaded
experts) the same bytes hold ~3.6× more experts: each slot holds the codes and group scales of
`Int4Experts`' decode layout (gate_up codes uint8 [S, 2F, D/2] and scales [S, 2F, D/32]; down alike),
made from each expert's weights as it is read, by the same functions, so the cache holds exactly
what `Int4Experts.from_weights` would have made of the resident weights.

    L layers  E experts per layer  S cache slots  F expert hidden  D hidden
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from openk2.config import ModelConfig
from openk2 import info
from openk2.info import INT4_GROUP
from openk2.kernels import load_for
from openk2.offload.store import ExpertStore
from openk2.quant.int4_decode import quantize_halves, unpack_halves

POLICIES = ("lru", "lfu")
FORMATS = ("float", "int4")  # float: the weights in the load dtype; int4: Int4Experts' codes and scales
PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_bytes(cfg: ModelConfig, dtype: torch.dtype, fmt: str = "float") -> int:
    """One routed expert's weights in `dtype` (gate, up and down), or as int4 codes with `dtype` scales."""
    return info.expert_bytes(cfg, dtype.itemsize, fmt)


class ExpertCache:
    """`slots` routed experts (of any layers) in memory, filled from `store` when the router picks them.

    `fetch(layer, experts)` returns the slot of each expert, reading the missing ones and evicting
    others (never one fetched by the same call): LRU evicts the least recently used, LFU the least
    often used over the whole run (ties: least recently). One layer's top-k experts must fit. The
    missing experts of one call are read by `readers` threads at once, each weight a read of its own
    (a disk serves many reads in flight faster than one after another: here 0.55 GB/s with one, 1.2
    GB/s with 16, bench/offload.py; pread releases the GIL)."""

    def __init__(self, store: ExpertStore, slots: int, dtype: torch.dtype, device="cpu", policy: str = "lru",
                 readers: int = 16):
        cfg = store.cfg
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        if slots < cfg.num_experts_per_tok:
            need = cfg.num_experts_per_tok * expert_bytes(cfg, dtype)
            raise ValueError(f"an expert cache of {slots} experts cannot hold one layer's top-"
                             f"{cfg.num_experts_per_tok}: give it at least {need / 1e9:.3g} GB")
        self.store, self.policy, self.dtype, self.device = store, policy, dtype, torch.device(device)
        self.budget = slots * expert_bytes(cfg, dtype)  # the bytes it was given: kept in another format
        self._allocate("float", slots)
        self.uses: dict[tuple[int, int], int] = {}
        self.hits = self.misses = self.evictions = self.bytes_read = self.prefetched = self.prefetch_used = 0
        self.stall_s = 0.0
        # a GPU cache reads one weight at a time, through pinned CPU memory
        self._pool = ThreadPoolExecutor(readers, "expert-read") if self.device.type == "cpu" and readers > 1 else None
        self._buffers = threading.local()  # each reader thread's buffers (`_buffer`)

    def _allocate(self, fmt: str, slots: int) -> None:
        cfg, device = self.store.cfg, self.device
        D, F_ = cfg.hidden_size, cfg.moe_intermediate_size
        self.format, self.slots = fmt, slots
        if fmt == "float":
            self.gate_up_S2FD = torch.empty(slots, 2 * F_, D, dtype=self.dtype, device=device)
            self.down_SDF = torch.empty(slots, D, F_, dtype=self.dtype, device=device)
            self.gate_up_scale = self.down_scale = None
        else:  # the codes in the same two names, and their scales
            self.gate_up_S2FD = torch.empty(slots, 2 * F_, D // 2, dtype=torch.uint8, device=device)
            self.gate_up_scale = torch.empty(slots, 2 * F_, D // INT4_GROUP, dtype=self.dtype, device=device)
            self.down_SDF = torch.empty(slots, D, F_ // 2, dtype=torch.uint8, device=device)
            self.down_scale = torch.empty(slots, D, F_ // INT4_GROUP, dtype=self.dtype, device=device)
        self.where: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, by recency
        self.free = list(range(slots - 1, -1, -1))
        self.pending: dict[tuple[int, int], tuple[int, list]] = {}  # prefetches in flight: key -> (slot, reads)

    def to_format(self, fmt: str) -> None:
        """Hold the experts in `fmt` from now on, in the same bytes (more slots for int4); what the cache
        held is dropped. A no-op in the current format."""
        if fmt not in FORMATS:
            raise ValueError(f"an expert cache holds one of {', '.join(FORMATS)}, not {fmt!r}")
        if fmt == self.format:
            return
        cfg = self.store.cfg
        if fmt == "int4" and (cfg.hidden_size % INT4_GROUP or cfg.moe_intermediate_size % INT4_GROUP):
            raise ValueError(f"an int4 cache needs expert sizes in multiples of {INT4_GROUP} (hidden "
                             f"{cfg.hidden_size}, expert {cfg.moe_intermediate_size})")
        wait([f for _, reads in self.pending.values() for f in reads])
        slots = min(self.budget // expert_bytes(cfg, self.dtype, fmt), cfg.n_moe_layers * cfg.n_routed_experts)
        self._allocate(fmt, int(slots))
        if fmt == "int4":
            load_for(self.device)  # the decode step's kernel for these codes, where it builds

    def weights(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot's gate_up [2F, D] and down [D, F]: the cached tensors, or int4 dequantised to `dtype`
        (as `Int4Experts.weights`)."""
        if self.format == "float":
            return self.gate_up_S2FD[slot], self.down_SDF[slot]
        return (unpack_halves(self.gate_up_S2FD[slot], self.gate_up_scale[slot], dtype),
                unpack_halves(self.down_SDF[slot], self.down_scale[slot], dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.gate_up_S2FD, self.down_SDF, self.gate_up_scale, self.down_scale)
                   if t is not None)

    def fetch(self, layer: int, experts: list[int]) -> list[int]:
        if len(experts) > self.slots:
            raise ValueError(f"{len(experts)} experts asked at once from a cache of {self.slots}")
        keep = {(layer, e) for e in experts}
        out, todo = [], {}
        t0 = time.perf_counter()
        ready = [k for k, (_, reads) in self.pending.items() if k in keep or all(f.done() for f in reads)]
        landed = {key for key in ready if self._land(key, key in keep)}  # waits for the prefetches needed now
        self.stall_s += time.perf_counter() - t0
        for e in experts:
            key = (layer, e)
            self.uses[key] = self.uses.get(key, 0) + 1
            if key in self.where:
                self.hits += key not in landed  # a prefetched expert counts as `prefetch_used`
                self.where.move_to_end(key)
            elif key not in todo:
                self.misses += 1
                todo[key] = self.free.pop() if self.free else self._evict(keep)
            out.append(self.where[key] if key in self.where else todo[key])
        if todo:
            t0 = time.perf_counter()
            try:
                self.bytes_read += self._read_all(todo)
            except BaseException:
                self.free.extend(todo.values())  # their contents are undefined: never serve them
                raise
            finally:
                self.stall_s += time.perf_counter() - t0
            self.where.update(todo)
        return out

    def prefetch(self, layer: int, experts: list[int], keep: set) -> None:
        """Start reading `layer`'s `experts` that are not cached, in the background (never evicting
        those in `keep`); `fetch` waits for those it needs. A no-op without reader threads."""
        for e in experts if self._pool is not None else []:
            key = (layer, e)
            if key in self.where or key in self.pending:
                continue
            if not self.free and all(k in keep for k in self.where):
                return
            slot = self.free.pop() if self.free else self._evict(keep)
            self.pending[key] = slot, [self._pool.submit(self._read_part, layer, e, proj, slot) for proj in PROJS]
            self.prefetched += 1

    def _land(self, key: tuple[int, int], needed: bool) -> bool:
        """A prefetch's slot joins the cache once its reads are done; a failed one frees its slot (and
        raises if the expert is needed now)."""
        slot, reads = self.pending.pop(key)
        wait(reads)
        if any(f.exception() for f in reads):
            self.free.append(slot)
            if needed:
                raise next(f.exception() for f in reads if f.exception())
            return False
        self.bytes_read += sum(f.result() for f in reads)
        self.where[key] = slot
        self.prefetch_used += needed
        return True

    def _read_all(self, todo: dict) -> int:
        """Read every ((layer, expert) -> slot) of `todo`; all reads end before this returns or raises."""
        if self._pool is None or len(todo) == 1:
            return sum(self._read_part(layer, e, proj, slot) for (layer, e), slot in todo.items() for proj in PROJS)
        futures = [self._pool.submit(self._read_part, layer, e, proj, slot) for (layer, e), slot in todo.items()
                   for proj in PROJS]
        wait(futures)
        return sum(f.result() for f in futures)  # the first error, if any, raised here

    def _evict(self, keep: set) -> int:
        candidates = [k for k in self.where if k not in keep]  # oldest first
        if not candidates:  # every cached expert is wanted now: take back a prefetch's slot
            slot, reads = self.pending.pop(next(k for k in self.pending if k not in keep))
            wait(reads)
            return slot
        if self.policy == "lru":
            victim = candidates[0]
        else:
            victim = min(candidates, key=self.uses.__getitem__)  # min keeps the first (oldest) of ties
        self.evictions += 1
        return self.where.pop(victim)

    def _read_part(self, layer: int, expert: int, proj: str, slot: int) -> int:
        """One stored weight of an expert into its slot (reader threads read different parts at once);
        returns the bytes read. Float weights on the CPU land in the slot directly, and so do INT4
        checkpoints' codes and scales in an int4 cache; otherwise the weight is read into CPU memory,
        made int4 codes and scales if the cache holds those, and copied."""
        dest = dict(ExpertStore.parts(self.gate_up_S2FD[slot], self.down_SDF[slot]))[proj]
        if self.format == "float" and self.device.type == "cpu":
            return self.store.read_part(layer, expert, proj, dest)
        scale = self.format == "int4" and dict(ExpertStore.parts(self.gate_up_scale[slot], self.down_scale[slot]))[proj]
        if self.format == "int4" and (n := self.store.read_int4_part(layer, expert, proj, dest, scale)) is not None:
            return n  # an INT4 checkpoint's own codes and scales
        shape = (dest.shape[0], dest.shape[1] * (2 if self.format == "int4" else 1))
        w = self._buffer(shape)
        nbytes = self.store.read_part(layer, expert, proj, w)
        with torch.inference_mode(dest.is_inference()):  # a reader thread has no inference mode of its own
            if self.format == "int4":
                w, s = quantize_halves(w)
                scale.copy_(s)
            dest.copy_(w)
        return nbytes

    def _buffer(self, shape: tuple[int, int]) -> torch.Tensor:
        """This thread's CPU buffer for one weight of `shape`, made once (a fresh one per read would
        fault in its pages on every miss); pinned for a GPU's copy."""
        buffers = self._buffers.__dict__
        if shape not in buffers:
            buffers[shape] = torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        return buffers[shape]

    def summary(self) -> str:
        s = self.stats()
        return (f"expert cache: {s['resident']}/{s['slots']} experts ({s['bytes'] / 1e9:.2f} GB, {s['format']}, "
                f"{s['policy']}), "
                f"hit rate {100 * s['hit_rate']:.1f} % ({s['hits']:,} hits, {s['misses']:,} misses), "
                f"{s['bytes_read'] / 1e9:.2f} GB read, {s['stall_s']:.2f} s stalled on reads")

    def stats(self) -> dict:
        asked = self.hits + self.misses + self.prefetch_used
        return {"slots": self.slots, "resident": len(self.where), "bytes": self.nbytes, "policy": self.policy,
                "format": self.format,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / asked if asked else 0.0,
                "evictions": self.evictions, "bytes_read": self.bytes_read, "stall_s": self.stall_s,
                "prefetched": self.prefetched, "prefetch_used": self.prefetch_used}
