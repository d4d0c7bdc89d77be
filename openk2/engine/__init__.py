"""Inference on token ids: sampling, a simple single-batch generation loop (`generate`), and the
continuous-batching `Engine` over a block-allocated latent cache."""

from openk2.engine.engine import Engine, Request
from openk2.engine.generate import generate, generate_recompute
from openk2.engine.sampler import SamplingParams, sample

__all__ = ["Engine", "Request", "generate", "generate_recompute", "sample", "SamplingParams"]
