"""Simple generation for one batch of equal-length prompts, on the absorbed-MLA latent cache.

`generate_recompute` is its reference: no cache, the whole sequence re-run every step;
tests/test_generate.py checks the two give identical greedy tokens. The batching engine with a
paged cache and continuous batching is a separate, later piece.
"""

import contextlib
from collections.abc import Iterator

import torch

from openk2.engine.sampler import SamplingParams, sample
from openk2.model.transformer import Transformer


@contextlib.contextmanager
def decode_kernels(model: Transformer, rows: int):
    """Matmul kernels for a decode step of `rows` tokens.

    On CPU, oneDNN's bf16/fp16 matmul costs ~30 µs a call whatever its size, while ATen's own kernel
    takes ~11 µs for a single row (and far longer for many): one- or two-row decode steps, where
    every matmul is a matrix-vector product, run without oneDNN (bench/forward.py measures it).
    The switch is process-wide (`torch.backends.mkldnn.enabled`): not for concurrent threads.
    """
    w = model.lm_head.weight
    off = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and rows <= 2
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _generator(params: SamplingParams, device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None


@torch.inference_mode()
def generate_stream(model: Transformer, prompt_ids: torch.Tensor, params: SamplingParams) -> Iterator[torch.Tensor]:
    """Yield next-token ids [B] one step at a time; prompt_ids [B, S] (or [S])."""
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    B, S = prompt_ids.shape
    limit = model.cfg.max_position_embeddings
    if S + params.max_tokens > limit:
        raise ValueError(f"prompt ({S}) + max_tokens ({params.max_tokens}) exceeds the context ({limit})")
    if S == 0:
        raise ValueError("empty prompt")
    device = model.lm_head.weight.device
    gen = _generator(params, device)
    cache = model.new_cache(B, S + params.max_tokens)
    logits = model(prompt_ids.to(device), 0, cache)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(params.stop_token_ids, device=device, dtype=torch.long)
    for step in range(params.max_tokens):
        tok = sample(logits, params, gen)
        yield tok
        done |= torch.isin(tok, stops)
        if done.all() or step == params.max_tokens - 1:
            return
        with decode_kernels(model, B):
            logits = model(tok[:, None], S + step, cache)[:, -1]


def generate(model: Transformer, prompt_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Generated ids [B, n] (rows that stopped early keep producing until all stop)."""
    steps = list(generate_stream(model, prompt_ids, params))
    B = 1 if prompt_ids.dim() == 1 else prompt_ids.shape[0]
    return torch.stack(steps, dim=1) if steps else torch.empty(B, 0, dtype=torch.long)


@torch.inference_mode()
def generate_recompute(model: Transformer, prompt_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Reference: recompute the full sequence (materialised MLA, no cache) for every new token."""
    ids = prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids
    gen = _generator(params, ids.device)
    out = []
    for _ in range(params.max_tokens):
        tok = sample(model(ids)[:, -1], params, gen)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        if params.stop_token_ids and torch.isin(torch.stack(out, 1), torch.tensor(params.stop_token_ids)).any(1).all():
            break
    return torch.stack(out, dim=1)
