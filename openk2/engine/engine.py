"""Continuous batching over the latent block cache: token ids in, token ids out (no text, no tools).

Each `step()` admits waiting requests whose whole budget (prompt + max_tokens) fits the free blocks
(reserved up front, so a running request never waits for memory), runs one prefill chunk of at most
`prefill_chunk` tokens for the oldest request still prefilling (a long prompt cannot stall the
others for more than one chunk), then one batched decode step for every other running request —
rows at different lengths, each at its own position. Finished and cancelled requests leave and free
their blocks at once; new ones join between steps. Sampling is per request (its own parameters and
seeded generator). The reference is `generate_recompute`; tests/test_engine.py checks that greedy
output equals it for every request of a mixed batch joining at different steps.
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from openk2.engine.generate import decode_kernels
from openk2.engine.kv_cache import BlockPool
from openk2.engine.sampler import SamplingParams, sample
from openk2.model.transformer import Transformer


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the cache
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, model: Transformer, cache_tokens: int = 8192, block_size: int = 16,
                 max_batch: int = 32, prefill_chunk: int = 256):
        w = model.lm_head.weight
        self.model, self.max_batch, self.prefill_chunk = model.eval(), max_batch, prefill_chunk
        self.pool = BlockPool(model.cfg, -(-cache_tokens // block_size), block_size, w.dtype, w.device)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count()

    # --- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Queue a request; ValueError (never an OOM later) for one that can never be served."""
        cfg, need = self.model.cfg, len(prompt_ids) + params.max_tokens
        if not prompt_ids or params.max_tokens < 1:
            raise ValueError("a request needs a non-empty prompt and max_tokens >= 1")
        if any(not 0 <= t < cfg.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt ids must lie in [0, {cfg.vocab_size})")
        if need > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context ({cfg.max_position_embeddings})")
        if self.pool.blocks_for(need) > self.pool.num_blocks:
            raise ValueError(f"the request needs {need} tokens of cache, the engine holds {self.pool.capacity}")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.pool.pools[0].device).manual_seed(params.seed)
        req = Request(next(self._ids), list(prompt_ids), params, generator=gen)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        if not req.finished:
            self._finish(req, "cancelled")

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.pool.release(req.blocks)
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            need = self.pool.blocks_for(len(req.prompt) + req.params.max_tokens)
            if need > len(self.pool.free):
                return  # first come, first served: it waits for blocks to be freed
            self.pool.grow(req.blocks, len(req.prompt) + req.params.max_tokens)
            self.running.append(self.waiting.pop(0))

    # --- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Run one scheduling step; returns the (request, token) pairs it produced."""
        self._admit()
        events = []
        decoding = [r for r in self.running if r.prefilled == len(r.prompt)]
        prefilling = next((r for r in self.running if r.prefilled < len(r.prompt)), None)
        if prefilling is not None:
            events += self._prefill_chunk(prefilling)
        if decoding:
            events += self._decode(decoding)
        return events

    def _prefill_chunk(self, req: Request) -> list[tuple[Request, int]]:
        start = req.prefilled
        n = min(self.prefill_chunk, len(req.prompt) - start)
        device = self.pool.pools[0].device
        cache = self.pool.gather([req.blocks], start + n)
        logits = self.model(torch.tensor([req.prompt[start:start + n]], device=device), start, cache)
        self.pool.scatter(cache, [req.blocks], [start], n)
        req.prefilled += n
        return [self._emit(req, logits[:, -1])] if req.prefilled == len(req.prompt) else []

    def _decode(self, rows: list[Request]) -> list[tuple[Request, int]]:
        starts = [len(r.prompt) + len(r.output) - 1 for r in rows]  # where each last token goes
        device = self.pool.pools[0].device
        cache = self.pool.gather([r.blocks for r in rows], max(starts) + 1)
        ids = torch.tensor([[r.output[-1]] for r in rows], device=device)
        with decode_kernels(self.model, len(rows)):
            logits = self.model(ids, torch.tensor(starts, device=device), cache)[:, -1]
        self.pool.scatter(cache, [r.blocks for r in rows], starts, 1)
        return [self._emit(r, logits[i:i + 1]) for i, r in enumerate(rows)]

    def _emit(self, req: Request, logits_1V: torch.Tensor) -> tuple[Request, int]:
        tok = int(sample(logits_1V, req.params, req.generator)[0])
        req.output.append(tok)
        if tok in req.params.stop_token_ids:
            self._finish(req, "stop")
        elif len(req.output) >= req.params.max_tokens:
            self._finish(req, "length")
        return req, tok

    # --- conveniences --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.has_work():
            self.step()

    def stream(self, req: Request) -> Iterator[int]:
        """Tokens of `req` as they are produced (other requests advance in the same steps)."""
        sent = 0
        while True:
            if sent < len(req.output):
                yield from req.output[sent:]
                sent = len(req.output)
            if req.finished or not self.has_work():
                return
            self.step()
