"""Continuous batching over the latent block cache: token ids in, token ids out (no text, no tools).

Each `step()` admits waiting requests whose whole budget (prompt + max_tokens) fits the available
blocks (reserved up front: a running request never waits for memory), runs one prefill forward of at
most `prefill_chunk` padded tokens (`idle_prefill_chunk` while none decodes) — the oldest prefilling
request's next chunk, later prompts batched beside it (a long prompt stalls the others for one chunk at
most) — then one batched decode step for
every other running request, each row at its own position (the compiled step of `decode.py` with
`compile`). Finished and cancelled requests free their blocks at once; new ones join between steps.
Sampling is per request (its own parameters and seeded generator; greedy rows share one argmax); a
request with a grammar (`SamplingParams.grammar`) has its logits masked to what its `Constraint`
allows, all such rows in one bitmask, and ends once the grammar is complete. With `prefix_cache` (the
default) a request starts from the cached rows of the longest full-block prefix of its prompt that an
earlier request computed (its prompt, or prompt and reply: an agent's next turn re-sends both) and
prefills only the rest (`Request.cached_tokens`; kv_cache.py). The reference is `generate_recompute`;
tests/test_engine.py checks that greedy output equals it for every request of a mixed batch joining
at different steps.

Log-probs, for a request that asks (`SamplingParams.logprobs`, `prompt_logprobs`): `Request.logprobs`
holds one `TokenLogprob` per output token, `Request.prompt_logprobs` one per prompt token (None for the
first), computed by `sampler.token_logprobs` from the raw logits; rows that do not ask cost nothing.
"""

import itertools
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from openk2 import kernels
from openk2.engine.decode import CompiledDecode, compilable, decode_kernels, small_batch
from openk2.engine.kv_cache import BlockPool
from openk2.engine.sampler import SamplingParams, TokenLogprob, apply_mask, sample, token_logprobs
from openk2.model.transformer import Transformer


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    slots: torch.Tensor | None = None  # pool rows of positions 0 .. prompt + max_tokens - 1, from admission
    first_row: int | None = None  # where its rows start in the pool, if its blocks are consecutive
    prefilled: int = 0  # prompt tokens in the cache
    cached_tokens: int = 0  # of those, how many were found in the prefix cache (not computed)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, if params.logprobs
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # if params.prompt_logprobs
    constraint: object | None = None  # the grammar's state (sampler.Constraint), if constrained

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def score_prompt(req: Request, logits_SV: torch.Tensor, start: int) -> None:
    """Record the log-probs of the prompt tokens that a prefill chunk's logits predict: the logits at
    position start+j score prompt[start+j+1], so a chunk's last position scores the next chunk's first
    token (the prompt is known: nothing waits for the next chunk); at the prompt's end it predicts
    the first output token, which `_emit` scores. The first prompt token has no log-prob (None)."""
    if start == 0:
        req.prompt_logprobs.append(None)
    targets = req.prompt[start + 1:start + len(logits_SV) + 1]
    if targets:
        req.prompt_logprobs += token_logprobs(logits_SV[:len(targets)], targets, req.params.logprobs or 0)


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of an Engine. Not here: sampling, which is per request (`SamplingParams`; the commands'
    defaults are named in openk2/sampling.py), and CPU threads, which are process-wide (torch's pool;
    set by the command that owns the process: `openk2 generate --threads`, training)."""
    cache_tokens: int = 8192  # latent cache rows in the block pool, for all requests together
    block_size: int = 16  # cache rows per block
    max_batch: int = 32  # requests running (decoding together) at most
    prefill_chunk: int = 512  # new prompt tokens per prefill forward (padded, all its rows) while others
    # decode: larger prefills faster (a chunk re-expands its prefix's keys), stalls longer (bench/serve.py)
    idle_prefill_chunk: int = 4096  # the same while none decodes (nothing to stall)
    compile: bool = False  # decode steps through `CompiledDecode`
    prefix_cache: bool = True  # reuse the cached rows of a prompt's longest already-computed prefix

    def __post_init__(self):
        if min(self.cache_tokens, self.block_size, self.max_batch, self.prefill_chunk, self.idle_prefill_chunk) < 1:
            raise ValueError(f"every size of an EngineConfig must be >= 1: {self}")


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig()):
        """With `config.compile`, each batch regime's decode step compiles on first use (or in `warmup`),
        fused kernels reading the pool in place."""
        w, c = model.lm_head.weight, config
        self.model, self.config = model.eval(), config
        kernels.load_for(w.device)  # the experts' kernels (openk2.kernels), for eager and compiled steps
        self.pool = BlockPool(model.cfg, -(-c.cache_tokens // c.block_size), c.block_size, w.dtype, w.device)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.compiled = CompiledDecode(model) if c.compile and compilable(model) else None
        self._warming: CompiledDecode | None = None  # compiling on a thread (warmup(background=True))

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
        gen = None if params.seed is None else torch.Generator(device=self.pool.device).manual_seed(params.seed)
        req = Request(next(self._ids), list(prompt_ids), params, generator=gen,
                      constraint=params.grammar.start() if params.grammar is not None else None)
        self.waiting.append(req)
        return req

    def weights_changed(self) -> None:
        """After an in-place weight update (RL): no row of the old weights is served again."""
        if self.running or self.waiting:
            raise RuntimeError("update the weights between requests: some are still running")
        self.pool.forget()

    def cancel(self, req: Request) -> None:
        if not req.finished:
            self._finish(req, "cancelled")

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if self.config.prefix_cache and req.blocks:  # rows computed: the prompt's, then all but the last output's
            done = len(req.prompt) + len(req.output) - 1 if req.output else req.prefilled
            self.pool.register(req.blocks, (req.prompt + req.output)[:done])
        self.pool.release(req.blocks)
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch:
            req = self.waiting[0]
            budget, reuse = len(req.prompt) + req.params.max_tokens, self.config.prefix_cache
            # cached rows of its prompt (the last token is always computed; prompt log-probs need every one)
            shared = self.pool.match(req.prompt[:-1]) if reuse and not req.params.prompt_logprobs else []
            if not self.pool.fits(shared, budget):
                return  # first come, first served: it waits for blocks to be freed
            # its blocks are reserved up front: where each position's row lives is known from now on
            self.pool.share(shared)
            req.blocks, req.prefilled = list(shared), len(shared) * self.pool.block_size
            req.cached_tokens = req.prefilled
            req.slots, req.first_row = self.pool.reserve(req.blocks, budget)
            self.running.append(self.waiting.pop(0))

    # --- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Run one scheduling step; returns the (request, token) pairs it produced."""
        self._admit()
        events = []
        decoding = [r for r in self.running if r.prefilled == len(r.prompt)]
        prefilling = [r for r in self.running if r.prefilled < len(r.prompt)]
        if prefilling:  # a bounded chunk while others decode, a larger one while none does
            c = self.config
            events += self._prefill(prefilling, c.prefill_chunk if decoding else c.idle_prefill_chunk)
        if decoding:
            events += self._decode(decoding)
        return events

    def _prefill(self, prefilling: list[Request], chunk: int) -> list[tuple[Request, int]]:
        """One prefill forward of at most `chunk` (padded) new tokens: the oldest request's
        next chunk, plus later requests beside it at the same padded width, as long as the batch's
        cache (rows × the deepest row's length) stays within twice what the oldest alone would use."""
        first = prefilling[0]
        width = min(chunk, len(first.prompt) - first.prefilled)
        depth = max(chunk, first.prefilled + width)  # its cache rows, or one chunk
        rows, deepest = [first], first.prefilled
        for r in prefilling[1:chunk // width]:
            if (len(rows) + 1) * (max(deepest, r.prefilled) + width) > 2 * depth:
                break
            rows.append(r)
            deepest = max(deepest, r.prefilled)
        starts = [r.prefilled for r in rows]
        counts = [min(width, len(r.prompt) - r.prefilled) for r in rows]
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded: padding sits after
        # logits only where they are read: every prompt position of rows that score their prompt, the
        # last one of rows whose prompt ends here (to sample from), none elsewhere
        keep = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (r, s, n) in enumerate(zip(rows, starts, counts)):  # every real token, never seen
            ids[i, :n] = torch.tensor(r.prompt[s:s + n])
            keep[i, :n] = bool(r.params.prompt_logprobs)
            keep[i, n - 1] |= s + n == len(r.prompt)
        device, tables = self.pool.device, [r.blocks for r in rows]
        cache = self.pool.gather(tables, max(starts) + width)
        start = starts[0] if len(set(starts)) == 1 else torch.tensor(starts, device=device)
        logits_MV = self.model(ids.to(device), start, cache, keep=keep.to(device))
        self.pool.scatter(cache, tables, starts, counts)
        done = []
        for r, s, n, logits_KV in zip(rows, starts, counts, logits_MV.split(keep.sum(1).tolist())):
            if r.params.prompt_logprobs:
                score_prompt(r, logits_KV, s)
            r.prefilled += n
            if r.prefilled == len(r.prompt):
                done.append((r, logits_KV[-1]))
                if self.config.prefix_cache:  # its prompt's rows, for requests that start the same way
                    self.pool.register(r.blocks, r.prompt)
        return self._emit([r for r, _ in done], torch.stack([l for _, l in done])) if done else []

    def _decode(self, rows: list[Request]) -> list[tuple[Request, int]]:
        starts = [len(r.prompt) + len(r.output) - 1 for r in rows]  # where each last token goes
        ids_N, pos_N = (torch.tensor(x, device=self.pool.device) for x in ([r.output[-1] for r in rows], starts))
        length = max(starts) + 1
        # eager steps of requests whose blocks are one run each read and write the pool in place;
        # the others go through their pool rows, fixed at admission (a step only slices them)
        view = None if self.compiled is not None else self.pool.view([r.first_row for r in rows], length)
        slots_NT = None if view else pad_sequence([r.slots[:length] for r in rows], batch_first=True)
        if self.compiled is not None:
            return self._emit(rows, self.compiled(ids_N, pos_N, slots_NT, self.pool.rows))
        cache = view or self.pool.read(slots_NT)
        # rows at one position (one row; a batch that started together) take the model's shared-
        # position path: a slice write and no mask, where per-row positions index and mask
        start = starts[0] if len(set(starts)) == 1 else pos_N
        with decode_kernels(self.model, len(rows)):
            logits_NV = self.model(ids_N[:, None], start, cache)[:, -1]
        if view is None:
            self.pool.write(cache, slots_NT, starts)
        return self._emit(rows, logits_NV)

    def _emit(self, rows: list[Request], logits_NV: torch.Tensor) -> list[tuple[Request, int]]:
        """Sample one token per row (greedy rows in one argmax), append it, finish rows that stop."""
        raw_NV, logits_NV = logits_NV, self._mask(rows, logits_NV)
        greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0]
        greedy_GV = logits_NV if len(greedy) == len(rows) else logits_NV[greedy]  # (indexing copies)
        toks = dict(zip(greedy, sample(greedy_GV, rows[greedy[0]].params).tolist())) if greedy else {}  # argmax
        events = []
        for i, req in enumerate(rows):
            tok = toks[i] if i in toks else int(sample(logits_NV[i:i + 1], req.params, req.generator)[0])
            req.output.append(tok)
            if req.params.logprobs is not None:  # of the raw logits, whatever shaped the sampling
                req.logprobs += token_logprobs(raw_NV[i:i + 1], [tok], req.params.logprobs)
            if req.constraint is not None:
                req.constraint.advance(tok)
            if tok in req.params.stop_token_ids or (req.constraint is not None and req.constraint.done):
                self._finish(req, "stop")
            elif len(req.output) >= req.params.max_tokens:
                self._finish(req, "length")
            events.append((req, tok))
        return events

    def _mask(self, rows: list[Request], logits_NV: torch.Tensor) -> torch.Tensor:
        """The logits to sample from: constrained rows' disallowed ids at -inf (their grammars' allowed
        ids filled on the CPU while the device may still be computing the logits, one bitmask for all
        of them, applied to a copy: log-probs stay the model's), or `logits_NV` itself."""
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        if constrained:
            logits_NV = logits_NV.clone()
            bitmask_MW = torch.zeros(len(constrained), -(-logits_NV.shape[-1] // 32), dtype=torch.int32)
            for m, i in enumerate(constrained):
                rows[i].constraint.fill(bitmask_MW[m])
            apply_mask(logits_NV, constrained, bitmask_MW)
        return logits_NV

    # --- conveniences --------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.has_work():
            self.step()

    def warmup(self, background: bool = False, progress=None) -> threading.Thread | None:
        """Compile the decode step for each batch regime up to max_batch (one row, a small batch, a
        large one) instead of during the first requests; a no-op without `compile`. background: on a
        thread of its own, while this engine keeps serving with eager decode steps (slower, never
        waiting); the compiled step takes over once every regime is ready (`decode_mode`). Returns
        that thread. progress(message) hears of each graph as it is compiled."""
        if self.compiled is None:
            return None
        compiled, cfg = self.compiled, self.model.cfg
        most = self.config.max_batch
        large = next((n for n in range(2, most + 1) if not small_batch(n, cfg)), None)
        sizes = sorted({1, min(2, most), large or 1})
        started, interval = time.monotonic(), sys.getswitchinterval()

        def work():
            try:
                compiled.warm(sizes, progress)
            finally:  # on a compiler failure the step itself falls back to the reference
                self.compiled, self._warming = compiled, None
                sys.setswitchinterval(interval)
            if progress:
                progress(f"decode step ready ({time.monotonic() - started:.0f} s): compiled steps from now on")

        if not background:
            work()
            return None

        # the compiler holds the GIL for seconds at a time while an eager step releases it in every
        # op: at Python's 5 ms switch interval each op would wait up to 5 ms to get it back
        self.compiled, self._warming = None, compiled
        sys.setswitchinterval(min(interval, 5e-5))
        thread = threading.Thread(target=work, name="openk2-compile", daemon=True)
        thread.start()
        return thread

    @property
    def decode_mode(self) -> str:
        """"compiled", "compiling" (eager steps until the background warmup ends) or "eager" (not
        asked for, weights the step cannot read, or the compiler failed)."""
        if self._warming is not None:
            return "compiling"
        return "compiled" if self.compiled is not None and not self.compiled.failed else "eager"

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
