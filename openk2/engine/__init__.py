"""Inference on token ids: sampling, a simple single-batch generation loop (`generate`), the
continuous-batching `Engine` over a block-allocated latent cache, and the compiled decode step both
can use (`decode.py`)."""

from openk2.engine.engine import Engine, EngineConfig, Request
from openk2.engine.generate import generate, generate_recompute, generate_stream
from openk2.engine.sampler import SamplingParams, sample

__all__ = ["Engine", "EngineConfig", "Request", "generate", "generate_recompute", "generate_stream", "sample",
           "SamplingParams"]
