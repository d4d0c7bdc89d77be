"""Inference on token ids: sampling and (for now) a simple single-batch generation loop."""

from openk2.engine.generate import generate, generate_recompute
from openk2.engine.sampler import SamplingParams, sample

__all__ = ["generate", "generate_recompute", "sample", "SamplingParams"]
