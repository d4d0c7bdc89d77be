"""openk2's CPU kernels for the decode step (openk2/kernels) against their references: the float
experts' grouped kernel (`openk2::float_pairs`) against exact products summed in float64, its input
checks, and the compiled decode step at a batch that takes it against the model's reference step.
(The int4 kernel's tests sit with its format, tests/test_quant.py.)"""

import pytest
import torch

from openk2.model.linear import PAIRS_KERNELS, pairs_matvec


def _case(dtype, width, seed=0):
    """23 rows over 5 experts of 42 outputs: expert 0 chosen by 9 rows (more than a 4-row block),
    expert 3 by none, the rest by a few; rows in no particular order."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 42, width, generator=g).to(dtype)
    idx = torch.tensor([0] * 9 + [1] * 5 + [2] + [4] * 8)[torch.randperm(23, generator=g)]
    return torch.randn(23, width, generator=g).to(dtype), w, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 512, 200])  # 200: a tail that is no multiple of the vector width
def test_float_pairs_equals_exact_products(dtype, width, cpu_kernels):
    x, w, idx = _case(dtype, width)
    got = torch.ops.openk2.float_pairs(x, w, idx)
    expect = (x.double()[:, None, :] * w.double()[idx]).sum(-1)  # bf16 products are exact in fp32
    assert got.dtype == torch.float32 and got.shape == (23, 42)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * width ** 0.5)
    # what the decode step calls for bf16 weights, through the same seam as the int4 kernel (fp32
    # weights keep the step's own paths, which measured faster)
    assert (dtype in PAIRS_KERNELS) == (dtype == torch.bfloat16)
    if dtype == torch.bfloat16:
        assert torch.equal(pairs_matvec(x, w, None, idx), got)


def test_float_pairs_takes_activations_of_another_dtype(cpu_kernels):
    """bf16 weights take fp32 activations rounded to bf16, as the model's bf16 matmuls take them."""
    x, w, idx = _case(torch.bfloat16, 64)
    x32 = x.float() * (1 + 2 ** -12)  # within half a bf16 step of x: rounds back to it
    assert torch.equal(torch.ops.openk2.float_pairs(x32, w, idx), torch.ops.openk2.float_pairs(x, w, idx))


def test_float_pairs_rejects_bad_input(cpu_kernels):
    x, w, idx = _case(torch.float32, 64)
    with pytest.raises(RuntimeError, match=r"idx outside \[0, 5\)"):
        torch.ops.openk2.float_pairs(x, w, idx.clone().fill_(5))
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        torch.ops.openk2.float_pairs(x[:, :32], w, idx)
    with pytest.raises(RuntimeError, match="bf16 or fp32 weights"):
        torch.ops.openk2.float_pairs(x, w.half(), idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 400])  # few rows an expert: the kernel; many: a matmul per expert
def test_eager_experts_take_the_kernel_for_few_rows(dtype, rows, cpu_kernels, monkeypatch):
    """`Experts.forward` without autograd (eager decode steps, short prompts) goes through the kernel
    when its bf16 experts have few rows each, and equals its own per-expert loop."""
    from openk2.config import PRESETS
    from openk2.model import linear
    from openk2.model.moe import Experts
    experts = Experts(PRESETS["k2-tiny"])
    g = torch.Generator().manual_seed(rows)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    experts = experts.to(dtype)
    counts_E = torch.bincount(torch.randint(0, 16, (rows,), generator=g), minlength=16)
    x_MD, w_M = torch.randn(rows, 64, generator=g).to(dtype), torch.rand(rows, generator=g)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = experts(x_MD, counts_E, w_M)
    assert ("openk2::float_pairs" in {e.name for e in prof.events()}) == (rows == 3 and dtype == torch.bfloat16)
    monkeypatch.setattr(linear, "PAIRS_KERNELS", {})
    with torch.no_grad():
        loop = experts(x_MD, counts_E, w_M)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the loop rounds the hidden layer once more
    torch.testing.assert_close(got.float(), loop.float(), rtol=tol, atol=tol)
