"""A bounded cache of routed experts in memory, filled from an `ExpertStore` when the router picks them.

`ExpertCache` holds `slots` experts of every layer in two stacked tensors (gate_up [S, 2F, D] and
down [S, D, F], allocated once: the cache never grows), on the CPU or a GPU, and evicts by LRU or
LFU. It counts hits, misses, bytes read and the seconds decoding waited on reads (`stats`).

    L layers  E experts per layer  S cache slots  F expert hidden  D hidden
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from openk2.config import ModelConfig
from openk2.info import expert_params
from openk2.offload.store import ExpertStore

POLICIES = ("lru", "lfu")


def expert_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """One routed expert's weights in `dtype` (gate, up and down)."""
    return expert_params(cfg) * dtype.itemsize


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
        D, F_ = cfg.hidden_size, cfg.moe_intermediate_size
        self.store, self.slots, self.policy = store, slots, policy
        self.gate_up_S2FD = torch.empty(slots, 2 * F_, D, dtype=dtype, device=device)
        self.down_SDF = torch.empty(slots, D, F_, dtype=dtype, device=device)
        self._staging = None if torch.device(device).type == "cpu" else (
            torch.empty(2 * F_, D, dtype=dtype, pin_memory=True), torch.empty(D, F_, dtype=dtype, pin_memory=True))
        self.where: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, by recency
        self.uses: dict[tuple[int, int], int] = {}
        self.free = list(range(slots - 1, -1, -1))
        self.pending: dict[tuple[int, int], tuple[int, list]] = {}  # prefetches in flight: key -> (slot, reads)
        self.hits = self.misses = self.evictions = self.bytes_read = self.prefetched = self.prefetch_used = 0
        self.stall_s = 0.0
        on_cpu = self._staging is None  # a GPU cache reads through its one pinned staging buffer
        self._pool = ThreadPoolExecutor(readers, "expert-read") if on_cpu and readers > 1 else None

    @property
    def nbytes(self) -> int:
        return self.gate_up_S2FD.nbytes + self.down_SDF.nbytes

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
            parts = self.store.parts(self.gate_up_S2FD[slot], self.down_SDF[slot])
            self.pending[key] = slot, [self._pool.submit(self.store.read_part, layer, e, p, d) for p, d in parts]
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
            return sum(self._read(layer, e, slot) for (layer, e), slot in todo.items())
        futures = [self._pool.submit(self.store.read_part, layer, e, proj, dest) for (layer, e), slot in todo.items()
                   for proj, dest in self.store.parts(self.gate_up_S2FD[slot], self.down_SDF[slot])]
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

    def _read(self, layer: int, expert: int, slot: int) -> int:
        if self._staging is None:
            return self.store.read_into(layer, expert, self.gate_up_S2FD[slot], self.down_SDF[slot])
        gate_up, down = self._staging  # GPU cache: disk -> pinned CPU -> device
        nbytes = self.store.read_into(layer, expert, gate_up, down)
        self.gate_up_S2FD[slot].copy_(gate_up)
        self.down_SDF[slot].copy_(down)
        return nbytes

    def summary(self) -> str:
        s = self.stats()
        return (f"expert cache: {s['resident']}/{s['slots']} experts ({s['bytes'] / 1e9:.2f} GB, {s['policy']}), "
                f"hit rate {100 * s['hit_rate']:.1f} % ({s['hits']:,} hits, {s['misses']:,} misses), "
                f"{s['bytes_read'] / 1e9:.2f} GB read, {s['stall_s']:.2f} s stalled on reads")

    def stats(self) -> dict:
        asked = self.hits + self.misses + self.prefetch_used
        return {"slots": self.slots, "resident": len(self.where), "bytes": self.nbytes, "policy": self.policy,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hits / asked if asked else 0.0,
                "evictions": self.evictions, "bytes_read": self.bytes_read, "stall_s": self.stall_s,
                "prefetched": self.prefetched, "prefetch_used": self.prefetch_used}
