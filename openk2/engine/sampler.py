"""Next-token sampling: greedy, temperature, top-k, top-p (nucleus), seeded; the log-probs a request
may ask for (`token_logprobs`, the one place they are computed); and the token mask of constrained
decoding (a grammar's allowed ids, as a bitmask, applied to the logits first). Pure functions, plus
the `Constraint` protocol the engine drives (server/constrain.py implements it)."""

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from openk2.sampling import GREEDY, MAX_TOKENS, TOP_K_OFF, TOP_P_OFF


class Constraint(Protocol):
    """One request's grammar state. Each step the engine asks for the allowed ids, samples among them,
    then advances the state with the chosen token; once `done` the request ends ("stop")."""
    done: bool

    def fill(self, row_W: torch.Tensor) -> None:
        """Write the allowed ids into int32 `row_W` (CPU, W = ceil(V / 32)): id v is bit v % 32 of word
        v // 32. At least one id must be allowed."""

    def advance(self, token: int) -> None: ...


@dataclass
class SamplingParams:
    temperature: float = GREEDY  # 0: greedy (the commands' own defaults: openk2/sampling.py)
    top_p: float = TOP_P_OFF  # 1: off
    top_k: int = TOP_K_OFF  # 0: off
    max_tokens: int = MAX_TOKENS
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: each output token's log-prob and the k most likely
    prompt_logprobs: bool = False  # also each prompt token's (the first has none), with the same k
    grammar: Any = None  # constrained decoding: `grammar.start()` gives each request its `Constraint`

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_tokens < 0:
            raise ValueError("top_k and max_tokens must be >= 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be None or >= 0, got {self.logprobs}")


@dataclass
class TokenLogprob:
    """One token's log-prob and the `k` most likely tokens at its position, (id, log-prob), best first."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """Token ids [B] from last-position logits [B, V]."""
    if params.temperature == 0:
        return logits_BV.max(-1).indices  # argmax's ids (the first of equal maxima), ~4x faster for bf16 on CPU
    logits = logits_BV.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def token_logprobs(logits_NV: torch.Tensor, tokens_N: list[int], k: int = 0) -> list[TokenLogprob]:
    """Log-probs of `tokens_N` (and the k most likely tokens) under log_softmax of the raw logits [N, V]
    in fp32: the model's own distribution, what OpenAI's `logprobs` and lm-eval mean and what RL needs
    as the policy's log-prob; independent of temperature, top-k and top-p (which only shape sampling).
    Shapes: logits_NV [N, V], tokens_N N ids."""
    logp_NV = logits_NV.float().log_softmax(-1)
    chosen = logp_NV.gather(-1, torch.tensor(tokens_N, device=logp_NV.device)[:, None])[:, 0].tolist()
    if k:
        top_lp, top_ids = logp_NV.topk(min(k, logp_NV.shape[-1]), dim=-1)
        tops = [list(zip(i, lp)) for i, lp in zip(top_ids.tolist(), top_lp.tolist())]
    else:
        tops = [[] for _ in tokens_N]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens_N, chosen, tops)]


def allowed_NV(bitmask_NW: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [N, V] from packed int32 words [N, W] (32·W >= V): bit i of word w allows id 32·w + i."""
    bits_32 = torch.arange(32, dtype=torch.int32, device=bitmask_NW.device)
    return ((bitmask_NW[:, :, None] >> bits_32) & 1).bool().flatten(1)[:, :vocab]


def apply_mask(logits_NV: torch.Tensor, rows: list[int], bitmask_MW: torch.Tensor) -> None:
    """In place: in logits row rows[m], every id that bitmask row m does not allow gets -inf."""
    allowed = allowed_NV(bitmask_MW.to(logits_NV.device, non_blocking=True), logits_NV.shape[-1])
    logits_NV[rows] = logits_NV[rows].masked_fill(~allowed, float("-inf"))
