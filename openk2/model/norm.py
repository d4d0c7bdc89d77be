"""RMSNorm with the reference numerics: normalise in fp32, cast back, then apply the weight."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm on fp32 is x · rsqrt(mean(x²) + eps), fused (tests/test_model.py checks the formula)
        y = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * y.to(x.dtype)  # weight after the downcast (K2-SPEC §3.1)
