"""Inference on token ids: sampling, the continuous-batching `Engine` over a block-allocated latent
cache (its knobs in `EngineConfig`) with its compiled decode step (`decode.py`), and `generate`, one
batch of prompts as Engine requests, beside `generate_recompute`, the reference."""

from openk2.engine.engine import Engine, EngineConfig, Request
from openk2.engine.generate import generate, generate_recompute, generate_stream
from openk2.engine.sampler import SamplingParams, sample

__all__ = ["Engine", "EngineConfig", "Request", "generate", "generate_recompute", "generate_stream", "sample",
           "SamplingParams"]
