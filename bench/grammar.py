"""Cost of constrained decoding per token: the grammar's mask (llguidance fills the bitmask; the
engine unpacks it and sets -inf on the logits) against one batch-1 decode step of the model, with the
issue's target: mask < 10 % of a step.

Model: the preset (k2-small: 8,192 ids) with random bf16 weights, through the Engine (eager, and the
compiled step with --compile). Tokenizer: a BPE trained here on openk2's own sources to fill the
model's vocabulary (K2's markers as special ids). Grammars: a forced call of one of two tools with
JSON-schema arguments ("required"), and a response_format json_schema; each is driven along a valid
reply token by token, timing `fill` + `apply_mask` at every position (mask cost per token). The last
rows time `apply_mask` alone at K2's vocabulary (163,840 ids), where unpacking costs the most.

    .venv/bin/python -m bench.grammar [--preset k2-small] [--threads 2] [--compile]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.forward import machine_line
from openk2.config import PRESETS
from openk2.engine import Engine, EngineConfig, SamplingParams
from openk2.engine.sampler import apply_mask
from openk2.model import build_model
from openk2.server.chat_format import ChatFormat
from openk2.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                                           "units": {"enum": ["metric", "imperial"]},
                                           "hourly": {"type": "boolean"}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "search", "parameters": {
             "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
ARGS = '{"city": "Paris, France", "days": 3, "units": "metric", "hourly": false}'
CASES = {  # (prompt kwargs, the reply after the prompt's forced prefix)
    "forced call (required)": ({"tools": TOOLS, "tool_choice": "required"},
                               f"get_weather:0<|tool_call_argument_begin|>{ARGS}<|tool_call_end|>"
                               "<|tool_calls_section_end|>"),
    "response_format json_schema": ({"response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "w", "schema": SCHEMA}}}, ARGS),
}


def step_ms(model, vocab: int, compile: bool, n: int = 48) -> float:
    """Median batch-1 decode step of the Engine (prefill and warm-up not counted)."""
    engine = Engine(model, EngineConfig(cache_tokens=1024, max_batch=1, compile=compile))
    engine.warmup()
    engine.add_request(torch.randint(0, vocab // 2, (32,)).tolist(), SamplingParams(max_tokens=n + 2))
    engine.step()  # prefill
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def mask_ms(fmt: ChatFormat, vocab: int, kwargs: dict, reply: str) -> tuple[float, float, int]:
    """Median per-token fill and apply times along `reply`, and its length in tokens."""
    grammar = fmt.prompt([{"role": "user", "content": "Weather in Paris?"}], **kwargs).grammar
    matcher, fills, applies = grammar.start(), [], []
    logits = torch.randn(1, vocab, dtype=torch.bfloat16)
    ids = fmt.tokenizer.encode(reply, allow_special=True)
    for tok in ids:
        bitmask = torch.zeros(1, -(-vocab // 32), dtype=torch.int32)
        t0 = time.perf_counter()
        matcher.fill(bitmask[0])
        t1 = time.perf_counter()
        apply_mask(logits, [0], bitmask)
        t2 = time.perf_counter()
        fills.append(t1 - t0)
        applies.append(t2 - t1)
        assert (int(bitmask[0, tok // 32]) >> (tok % 32)) & 1, "the reply left the grammar"
        matcher.advance(tok)
    return 1e3 * statistics.median(fills), 1e3 * statistics.median(applies), len(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="k2-small", choices=sorted(PRESETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text() for p in sorted(root.glob("openk2/**/*.py")) + sorted(root.glob("*.md"))]
    tokenizer = Tokenizer.train(texts, cfg.vocab_size)
    print(f"{machine_line(args.threads)} | preset {args.preset} | tokenizer {tokenizer.n_vocab} ids "
          f"(model {cfg.vocab_size})")
    model = build_model(cfg, seed=0).to(torch.bfloat16)
    fmt = ChatFormat.for_model(model, tokenizer)
    steps = {"eager": step_ms(model, cfg.vocab_size, False)}
    if args.compile:
        steps["compiled"] = step_ms(model, cfg.vocab_size, True)
    print("\n| per token | fill ms | apply ms | mask ms | tokens | " +
          " | ".join(f"vs {k} step ({v:.1f} ms)" for k, v in steps.items()) + " |")
    print("| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in steps) + " |")
    for name, (kwargs, reply) in CASES.items():
        fill, apply, n = mask_ms(fmt, cfg.vocab_size, kwargs, reply)
        ratios = " | ".join(f"{100 * (fill + apply) / v:.1f}% {'✓' if fill + apply < 0.1 * v else '✗'}"
                            for v in steps.values())
        print(f"| {name} | {fill:.3f} | {apply:.3f} | {fill + apply:.3f} | {n} | {ratios} |")
    for vocab in (cfg.vocab_size, 163840):
        logits, bitmask = torch.randn(1, vocab, dtype=torch.bfloat16), torch.full((1, -(-vocab // 32)), -1,
                                                                                   dtype=torch.int32)
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            apply_mask(logits, [0], bitmask)
            times.append(time.perf_counter() - t0)
        print(f"| apply alone, vocab {vocab} | | {1e3 * statistics.median(times):.3f} | | | |")
    print("\ntarget: mask (fill + apply) < 10 % of a batch-1 decode step")


if __name__ == "__main__":
    main()
