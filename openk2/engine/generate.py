"""Simple generation for one batch of equal-length prompts, on the absorbed-MLA latent cache.

`generate_recompute` is its reference: no cache, the whole sequence re-run every step;
tests/test_generate.py checks the two give identical greedy tokens. Decode steps run the model's
forward, or the compiled step of `decode.py` with `compile=True`. The continuous-batching engine
over a block cache is `engine.py`.
"""

from collections.abc import Iterator

import torch

from openk2.engine.decode import CompiledDecode, decode_kernels
from openk2.engine.sampler import SamplingParams, sample
from openk2.model.transformer import Transformer


def _generator(params: SamplingParams, device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None


@torch.inference_mode()
def generate_stream(model: Transformer, prompt_ids: torch.Tensor, params: SamplingParams,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield next-token ids [B] one step at a time; prompt_ids [B, S] (or [S]).
    compile: decode steps through `CompiledDecode` (the prompt runs eagerly)."""
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
    compiled = CompiledDecode(model) if compile else None  # refuses int4 before any work
    cache = model.new_cache(B, S + params.max_tokens)
    logits = model(prompt_ids.to(device), 0, cache)[:, -1]
    # the caches seen as pools with one run of rows per batch row, for the compiled step
    pools = [c.ckv.view(-1, c.ckv.shape[-1]) for c in cache]
    base_B1 = torch.arange(B, device=device)[:, None] * cache[0].ckv.shape[1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(params.stop_token_ids, device=device, dtype=torch.long)
    for step in range(params.max_tokens):
        tok = sample(logits, params, gen)
        yield tok
        done |= torch.isin(tok, stops)
        if done.all() or step == params.max_tokens - 1:
            return
        pos = S + step  # where tok goes
        if compiled is not None:
            pos_B = torch.full((B,), pos, device=device)
            logits = compiled(tok, pos_B, base_B1 + torch.arange(pos + 1, device=device), pools)
        else:
            with decode_kernels(model, B):
                logits = model(tok[:, None], pos, cache)[:, -1]


def generate(model: Transformer, prompt_ids: torch.Tensor, params: SamplingParams,
             compile: bool = False) -> torch.Tensor:
    """Generated ids [B, n] (rows that stopped early keep producing until all stop)."""
    steps = list(generate_stream(model, prompt_ids, params, compile))
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
