"""Generation for one batch of equal-length prompts, as requests to an Engine (the one decode path),
and its reference.

`generate_stream` gives each prompt row a request of its own in an Engine sized for the batch and
steps it; `generate` collects the tokens. `generate_recompute` is the reference: no cache, the whole
sequence re-run every step; tests/test_generate.py checks the two give identical tokens, greedy and
seeded. Rows sample independently, row r from a generator seeded `seed + r` (as the server's n
choices), in both.
"""

import dataclasses
from collections.abc import Iterator

import torch

from openk2.engine.engine import Engine, EngineConfig
from openk2.engine.sampler import SamplingParams, sample
from openk2.model.transformer import Transformer


def _row_params(params: SamplingParams, row: int) -> SamplingParams:
    """Row `row`'s parameters: its own seed, and no stop ids (the caller stops the batch as a whole)."""
    seed = None if params.seed is None else params.seed + row
    return dataclasses.replace(params, seed=seed, stop_token_ids=())


def generate_stream(model: Transformer, prompt_ids: torch.Tensor, params: SamplingParams,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield next-token ids [B] one step at a time; prompt_ids [B, S] (or [S]). Rows that stopped keep
    producing until all have (as the reference does). compile: `EngineConfig.compile`."""
    rows = (prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids).tolist()
    if params.max_tokens == 0:
        return
    B, S = len(rows), len(rows[0])
    # every prompt in one prefill forward (chunks keep a long prompt from stalling other requests;
    # here there are none, and each chunk would re-read the cache before it)
    config = EngineConfig(max_batch=B, prefill_chunk=B * S, idle_prefill_chunk=B * S, compile=compile)
    row_tokens = -(-(S + params.max_tokens) // config.block_size) * config.block_size  # in whole blocks
    engine = Engine(model, dataclasses.replace(config, cache_tokens=B * row_tokens))
    reqs = [engine.add_request(ids, _row_params(params, r)) for r, ids in enumerate(rows)]
    stops, done = set(params.stop_token_ids), [False] * B
    for n in range(params.max_tokens):
        while any(len(r.output) <= n for r in reqs):  # a long prompt prefills over several steps
            engine.step()
        toks = [r.output[n] for r in reqs]
        yield torch.tensor(toks, device=prompt_ids.device)
        done = [d or t in stops for d, t in zip(done, toks)]
        if all(done):
            return


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
    seeds = [_row_params(params, r).seed for r in range(ids.shape[0])]
    gens = [None if s is None else torch.Generator(device=ids.device).manual_seed(s) for s in seeds]
    out = []
    for _ in range(params.max_tokens):
        logits_BV = model(ids)[:, -1]
        tok = torch.cat([sample(logits_BV[r:r + 1], params, g) for r, g in enumerate(gens)])
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        if params.stop_token_ids and torch.isin(torch.stack(out, 1), torch.tensor(params.stop_token_ids)).any(1).all():
            break
    return torch.stack(out, dim=1)
