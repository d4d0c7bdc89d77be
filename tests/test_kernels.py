"""openk2's CPU kernels for the decode step (openk2/kernels) against their references: the grouped
kernels of float experts (`openk2::float_pairs`) and int8 codes (`openk2::int8_pairs`) against exact
products summed in float64, their AMX paths against the same and their vector paths, the int4 AMX
kernel (`openk2::int4_bf16_pairs`), their input checks, and the decode step's linears through them.
(The int4 kernel's tests sit with its format, tests/test_quant.py; the compiled step's, with the step,
tests/test_decode.py.)"""

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
    assert (dtype in PAIRS_KERNELS) == (dtype == torch.bfloat16) and torch.int8 in PAIRS_KERNELS
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


@pytest.fixture
def amx(cpu_kernels):
    """bf16 through AMX tiles, where the CPU has them (else this skips); the vector path is
    `torch.ops.openk2.set_amx(False)`, undone after the test."""
    if not torch.ops.openk2.set_amx(True):
        pytest.skip("no AMX on this CPU (or Linux refused its tiles): bf16 takes the vector path")
    yield
    from openk2 import kernels
    torch.ops.openk2.set_amx(kernels.amx_wanted())


@pytest.mark.parametrize("width", [96, 512])
def test_amx_equals_exact_products_and_the_vector_path(width, amx):
    """bf16 through tile multiplies: experts with 1 to 70 rows (one B tile, two, two and a tail),
    112 outputs (blocks of 4 and 3 tiles with one B tile, of 2 and 1 with two), rows in no order;
    equal to exact products, and to the vector path to fp32 rounding (the sums go in another order)."""
    g = torch.Generator().manual_seed(width)
    counts = [1, 4, 15, 16, 17, 0, 31, 32, 33, 70]
    idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = idx[torch.randperm(len(idx), generator=g)]
    x = torch.randn(len(idx), width, generator=g).bfloat16()
    w = torch.randn(len(counts), 112, width, generator=g).bfloat16()
    got = torch.ops.openk2.float_pairs(x, w, idx)
    expect = (x.double()[:, None, :] * w.double()[idx]).sum(-1)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * width ** 0.5)
    torch.ops.openk2.set_amx(False)
    vector = torch.ops.openk2.float_pairs(x, w, idx)
    torch.testing.assert_close(got, vector, rtol=1e-5, atol=1e-5 * width ** 0.5)
    assert not torch.equal(got, vector)  # the two paths did run: their fp32 sums round apart


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_amx_int8_equals_exact_products_and_the_vector_path(scale_dtype, amx):
    """int8 codes through tiles (widened to bf16, exact) with bf16 activations, the row scale after
    the sum: exact products, and the vector path to fp32 rounding; fp32 activations keep the vector
    path (tiles would round them to bf16)."""
    g = torch.Generator().manual_seed(7)
    counts = [1, 4, 15, 16, 17, 0, 31, 32, 33, 70]
    idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = idx[torch.randperm(len(idx), generator=g)]
    x = torch.randn(len(idx), 96, generator=g).bfloat16()
    codes = torch.randint(-127, 128, (len(counts), 112, 96), dtype=torch.int8, generator=g)
    scale = (torch.rand(len(counts), 112, generator=g) / 50).to(scale_dtype)
    got = torch.ops.openk2.int8_pairs(x, codes, scale, idx)
    expect = (x.double()[:, None, :] * codes.double()[idx]).sum(-1) * scale.double()[idx]
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    x32 = x.float() + torch.randn(x.shape, generator=g) * 1e-3  # not bf16: the exact fp32 products
    expect32 = (x32.double()[:, None, :] * codes.double()[idx]).sum(-1) * scale.double()[idx]
    got32 = torch.ops.openk2.int8_pairs(x32, codes, scale, idx)
    torch.testing.assert_close(got32.double(), expect32, rtol=1e-5, atol=1e-5 * expect32.abs().max().item())
    torch.ops.openk2.set_amx(False)
    vector = torch.ops.openk2.int8_pairs(x, codes, scale, idx)
    torch.testing.assert_close(got, vector, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    assert not torch.equal(got, vector)  # the two paths did run: their fp32 sums round apart
    assert torch.equal(torch.ops.openk2.int8_pairs(x32, codes, scale, idx), got32)  # fp32: one path


@pytest.mark.parametrize("group, scale_dtype", [(32, torch.bfloat16), (64, torch.float32), (128, torch.float16)])
def test_int4_bf16_pairs_equals_the_dequantised_products(group, scale_dtype, amx):
    """int4 codes (the decode layout) dequantised to bf16 as `unpack_halves` does, times bf16 rows:
    exact products of those weights summed in fp32, at 1 to 70 rows an expert; bad input refused."""
    from openk2.quant.int4_decode import quantize_halves, unpack_halves
    g = torch.Generator().manual_seed(group)
    counts = [1, 4, 15, 16, 17, 0, 31, 32, 33, 70]
    idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = idx[torch.randperm(len(idx), generator=g)]
    w = torch.randn(len(counts), 112, 256, generator=g).to(scale_dtype)
    codes, scale = (torch.stack(t) for t in zip(*(quantize_halves(w_OI, group) for w_OI in w)))
    assert scale.dtype == scale_dtype
    x = torch.randn(len(idx), 256, generator=g).bfloat16()
    got = torch.ops.openk2.int4_bf16_pairs(x, codes, scale, idx)
    expect = (x.double()[:, None, :] * unpack_halves(codes, scale, torch.bfloat16).double()[idx]).sum(-1)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        torch.ops.openk2.int4_bf16_pairs(x[:, :128], codes, scale, idx)
    with pytest.raises(RuntimeError, match="whole tiles of 16"):
        torch.ops.openk2.int4_bf16_pairs(x, codes[:, :40], scale[:, :40], idx)
    with pytest.raises(RuntimeError, match="multiple of 32 inputs"):
        torch.ops.openk2.int4_bf16_pairs(x, codes, scale.repeat(1, 1, 8), idx)
    torch.ops.openk2.set_amx(False)
    with pytest.raises(RuntimeError, match="needs AMX tiles"):
        torch.ops.openk2.int4_bf16_pairs(x, codes, scale, idx)


@pytest.mark.parametrize("rows", [40, 2400])
def test_int4_experts_take_the_rounded_kernel_for_many_rows(rows, amx):
    """Int4 experts past few rows an expert multiply by their weights dequantised to bf16: with AMX
    in one call for all used experts (`int4_bf16_pairs`, up to `AMX_CODES_ROWS` rows each), equal to
    the per-expert loop; past it, the loop."""
    from openk2.config import PRESETS
    from openk2.model import linear
    from openk2.model.moe import Experts
    from openk2.quant.int4_decode import Int4Experts
    from openk2 import kernels
    rounded = (torch.ops.openk2.int4_bf16_pairs, kernels._rounded_rows)  # registered even if OPENK2_AMX=0
    rounded_kernels = {torch.uint8: rounded}
    linear.ROUNDED_KERNELS, saved = rounded_kernels, linear.ROUNDED_KERNELS
    g = torch.Generator().manual_seed(rows)
    experts = Experts(PRESETS["k2-tiny"])
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    q4 = Int4Experts.from_experts(experts.to(torch.bfloat16))
    counts_E = torch.zeros(16, dtype=torch.long)
    counts_E[[1, 9]] = torch.tensor([rows // 2, rows - rows // 2])
    x, w_M = torch.randn(rows, 64, generator=g).bfloat16(), torch.rand(rows, generator=g)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = q4(x, counts_E, w_M)
    assert ("openk2::int4_bf16_pairs" in {e.name for e in prof.events()}) == (rows <= 2 * kernels.AMX_CODES_ROWS)
    with torch.no_grad():
        linear.ROUNDED_KERNELS = {}
        try:
            loop = q4(x, counts_E, w_M)
            x_grad = x.clone().requires_grad_()  # autograd needs x: the loop, never a kernel
            assert linear.experts_kernel(x_grad, 2, *q4.decode_weights) is None
        finally:
            linear.ROUNDED_KERNELS = saved
    scale = loop.float().abs().max().item()  # the loop rounds its hidden layer to bf16 once more
    torch.testing.assert_close(got.float(), loop.float(), rtol=2e-2, atol=1e-2 * scale)


def test_amx_takes_strided_and_fp32_activations(amx):
    """Activations of another dtype are rounded to bf16 first, strided ones read as they lie."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 32, 64, generator=g).bfloat16()
    idx = torch.randint(0, 4, (40,), generator=g)
    x = torch.randn(64, 40, generator=g).bfloat16().T  # [40, 64], column-major
    expect = torch.ops.openk2.float_pairs(x.contiguous(), w, idx)
    assert torch.equal(torch.ops.openk2.float_pairs(x, w, idx), expect)
    assert torch.equal(torch.ops.openk2.float_pairs(x.float(), w, idx), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 400])  # few rows an expert: the kernel; many: a matmul per expert
def test_eager_experts_take_the_kernel_for_few_rows(dtype, rows, cpu_kernels, monkeypatch):
    """`Experts.forward` without autograd (eager decode steps, short prompts) goes through the kernel
    when its bf16 experts have few rows each (`KERNEL_ROWS`, without AMX), and equals its own
    per-expert loop."""
    from openk2.config import PRESETS
    from openk2.model import linear
    from openk2.model.moe import Experts
    monkeypatch.setattr(linear, "PAIRS_ROWS", {})
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


def _int8_case(width, scale_dtype, seed=0):
    x, _, idx = _case(torch.bfloat16, width, seed)
    g = torch.Generator().manual_seed(seed + 1)
    codes = torch.randint(-127, 128, (5, 42, width), dtype=torch.int8, generator=g)
    return x, codes, (torch.rand(5, 42, generator=g) / 50).to(scale_dtype), idx


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 512, 200])
def test_int8_pairs_equals_exact_products(width, scale_dtype, cpu_kernels):
    """Row m times codes idx[m], then the row scale (fp32 products and sums: exact up to fp32 rounding);
    what `pairs_matvec` calls for int8 codes."""
    x, codes, scale, idx = _int8_case(width, scale_dtype)
    got = torch.ops.openk2.int8_pairs(x, codes, scale, idx)
    expect = (x.double()[:, None, :] * codes.double()[idx]).sum(-1) * scale.double()[idx]
    assert got.dtype == torch.float32 and got.shape == (23, 42)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    assert torch.equal(pairs_matvec(x, codes, scale, idx), got)
    # activations of any float dtype and layout: fp32 as they are, strided bf16 and fp32 views
    assert torch.equal(torch.ops.openk2.int8_pairs(x.float(), codes, scale, idx), got)
    for strided in (x.T.contiguous().T, x.float().T.contiguous().T, torch.stack([x, x], -1)[..., 0]):
        assert not strided.is_contiguous() and torch.equal(torch.ops.openk2.int8_pairs(strided, codes, scale, idx), got)
    # fp16 scales (an fp16 model's) read as they are
    half = scale.half()
    torch.testing.assert_close(torch.ops.openk2.int8_pairs(x, codes, half, idx),
                               torch.ops.openk2.int8_pairs(x, codes, half.float(), idx), rtol=0, atol=0)


def test_int8_pairs_rejects_bad_input(cpu_kernels):
    x, codes, scale, idx = _int8_case(64, torch.float32)
    with pytest.raises(RuntimeError, match=r"idx outside \[0, 5\)"):
        torch.ops.openk2.int8_pairs(x, codes, scale, idx.clone().fill_(-1))
    with pytest.raises(RuntimeError, match=r"scale \[E, O\]"):
        torch.ops.openk2.int8_pairs(x, codes, scale[:, :40], idx)
    with pytest.raises(RuntimeError, match="fp32, bf16 or fp16 scales"):
        torch.ops.openk2.int8_pairs(x, codes, scale.to(torch.int32), idx)
    with pytest.raises(RuntimeError, match="int8 codes"):
        torch.ops.openk2.int8_pairs(x, codes.to(torch.uint8), scale, idx)


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_decode_linears_take_the_kernels_at_small_batches(mode, cpu_kernels, monkeypatch):
    """The decode step's linears (`decode_linear`, small batches) are stacks of one through the kernel
    of their weights, and equal the fused loop it replaces (`matvec`) to its rounding."""
    from torch import nn

    from openk2.model import linear
    from openk2.quant.int8 import Int8Linear
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(200, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 200, generator=g) * 0.1)
    mod = lin.to(torch.bfloat16) if mode == "bf16" else Int8Linear.from_weight(lin.weight.to(torch.bfloat16))
    x = torch.randn(3, 200, generator=g).to(torch.bfloat16)
    with torch.profiler.profile() as prof:
        got = linear.decode_linear(mod, x, small=True)
    kernel = "openk2::float_pairs" if mode == "bf16" else "openk2::int8_pairs"
    assert kernel in {e.name for e in prof.events()} and got.dtype == torch.bfloat16
    monkeypatch.setattr(linear, "PAIRS_KERNELS", {})
    loop = linear.decode_linear(mod, x, small=True)
    torch.testing.assert_close(got.float(), loop.float(), rtol=2e-2, atol=2e-2)
    expect = mod(x)  # the module's own forward
    torch.testing.assert_close(got.float(), expect.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [24, 40])
def test_kernel_serves_as_many_rows_as_it_says(rows, cpu_kernels, monkeypatch):
    """A kernel that serves many rows for some shapes (`PAIRS_ROWS`: bf16 on AMX, whole tiles) takes
    the step's plain linears of those shapes past small batches, and eager experts up to that many
    rows a matrix; past it, or for other shapes, library matmuls. Either way the result is the
    module's."""
    from torch import nn

    from openk2.config import PRESETS
    from openk2.model import linear
    from openk2.model.moe import Experts
    monkeypatch.setattr(linear, "PAIRS_ROWS", {torch.bfloat16: lambda outs, ins, x_dtype: 32 if outs % 16 == 0 else 16})
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    experts = Experts(PRESETS["k2-tiny"])  # 16 experts of 64 -> 2 × 32 -> 64
    with torch.no_grad():
        for p in [*lin.parameters(), *experts.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    experts = experts.to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    counts_E = torch.zeros(16, dtype=torch.long)
    counts_E[:2] = torch.tensor([rows // 2, rows - rows // 2])  # two experts, rows / 2 each
    with torch.no_grad(), torch.profiler.profile() as prof:
        got_linear = linear.decode_linear(lin, x, small=False)
    assert "openk2::float_pairs" in {e.name for e in prof.events()}  # any batch: no guard on its size
    with torch.no_grad(), torch.profiler.profile() as prof:
        got_experts = experts(x, counts_E, torch.ones(rows))
    assert "openk2::float_pairs" in {e.name for e in prof.events()}  # ≤ 32 rows an expert
    with torch.no_grad():
        exact = x.double() @ lin.weight.double().T  # either path: the exact product rounded to bf16
        torch.testing.assert_close(got_linear.double(), exact, rtol=2 ** -8, atol=1e-3)
        monkeypatch.setattr(linear, "PAIRS_KERNELS", {})
        loop = experts(x, counts_E, torch.ones(rows))
    scale = loop.float().abs().max().item()  # bf16: the loop rounds the hidden layer once more
    torch.testing.assert_close(got_experts.float(), loop.float(), rtol=2e-2, atol=1e-2 * scale)
    w, odd = experts.gate_up_proj, experts.gate_up_proj[:, :40]  # 40 rows: no whole tiles, KERNEL_ROWS
    assert linear.few_rows(64, 2, w) and not linear.few_rows(65, 2, w)
    assert linear.few_rows(32, 2, odd) and not linear.few_rows(33, 2, odd)
    assert linear.few_rows(32, 2, w.to(torch.int8)) and not linear.few_rows(33, 2, w.to(torch.int8))
    with torch.no_grad(), torch.profiler.profile() as prof:  # a linear of no whole tiles: a matmul
        linear.decode_linear(nn.Linear(64, 40, bias=False).to(torch.bfloat16), x, small=False)
    assert "openk2::float_pairs" not in {e.name for e in prof.events()}


@pytest.mark.parametrize("rows", [3, 40])
def test_int8_experts_take_the_kernel_for_few_rows(rows, cpu_kernels, monkeypatch):
    """Stacked int8 experts (`QuantizedExperts`) go through `int8_pairs` eagerly when their rows are few
    an expert (up to `kernel_rows` of their codes), and equal their per-expert loop; past small
    batches the step's int8 linears do too where the kernel serves many rows."""
    from openk2.config import PRESETS
    from openk2.model import linear
    from openk2.model.moe import Experts
    from openk2.quant import QuantizedExperts
    from openk2.quant.int8 import Int8Linear
    bound = lambda outs, ins, x_dtype: 32 if x_dtype == torch.bfloat16 else 16  # noqa: E731 (as AMX: bf16 rows)
    monkeypatch.setattr(linear, "PAIRS_ROWS", {torch.int8: bound})
    g = torch.Generator().manual_seed(rows)
    experts = Experts(PRESETS["k2-tiny"])
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    q8 = QuantizedExperts.from_experts(experts.to(torch.bfloat16), Int8Linear)
    counts_E = torch.zeros(16, dtype=torch.long)
    counts_E[[2, 5]] = torch.tensor([rows // 2, rows - rows // 2])
    x, w_M = torch.randn(rows, 64, generator=g).bfloat16(), torch.rand(rows, generator=g)
    with torch.no_grad(), torch.profiler.profile() as prof:
        got = q8(x, counts_E, w_M)
    assert "openk2::int8_pairs" in {e.name for e in prof.events()}
    codes = q8.gate_up_q
    assert linear.few_rows(64, 2, codes, torch.bfloat16) and not linear.few_rows(64, 2, codes, torch.float32)
    with torch.no_grad(), torch.profiler.profile() as prof:
        lin = linear.decode_linear(q8.gate_up[2], x, small=False)
    assert "openk2::int8_pairs" in {e.name for e in prof.events()}
    with torch.no_grad():
        torch.testing.assert_close(lin.float(), q8.gate_up[2](x).float(), rtol=2e-2, atol=2e-2)
        monkeypatch.setattr(linear, "PAIRS_KERNELS", {})
        loop = q8(x, counts_E, w_M)
    scale = loop.float().abs().max().item()  # the loop rounds its hidden layer to bf16 once more
    torch.testing.assert_close(got.float(), loop.float(), rtol=2e-2, atol=1e-2 * scale)



def _latent_reference(q, pool, slots, pos, latent, scale):
    """The attention `openk2::latent_attention` computes, in float64: row n's queries against its cached
    rows pool[slots[n, t]] for t <= pos[n], softmax, the probabilities times the rows' first channels."""
    rows = pool.double()[slots]  # [N, T, L]
    scores = torch.einsum("nhl,ntl->nht", q.double(), rows) * scale
    visible = torch.arange(slots.shape[1]) <= pos[:, None]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("nht,ntc->nhc", probs, rows[..., :latent])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,width,latent", [(8, 160, 128),  # k2-small: whole vectors and blocks of heads
                                                (5, 40, 24),  # fewer heads than a block; no whole bf16 vector
                                                (12, 96, 72)])  # a block and a part; a tail of outputs
def test_latent_attention_equals_the_softmax_over_visible_rows(dtype, heads, width, latent, cpu_kernels):
    g = torch.Generator().manual_seed(heads)
    T, Z = 70, 400  # more positions than a block of rows, and than two
    q = (torch.randn(6, heads, width, generator=g) * 3).to(dtype)  # scores spread over ~±40
    pool = torch.randn(Z, width, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(Z, generator=g)[:T] for _ in range(6)])
    pos = torch.tensor([0, 1, 15, 16, 41, T - 1])  # one row visible; block edges; all
    slots[0, 1:] = Z + 5  # past a row's position its slots are never read
    got = torch.ops.openk2.latent_attention(q, pool, slots, pos, latent, 0.3)
    assert got.dtype == torch.float32 and got.shape == (6, heads, latent)
    torch.testing.assert_close(got.double(), _latent_reference(q, pool, slots.clamp(max=Z - 1), pos, latent, 0.3),
                               atol=2e-5, rtol=2e-5)


def test_latent_attention_rejects_bad_input(cpu_kernels):
    q, pool = torch.randn(2, 4, 32), torch.randn(10, 32)
    slots, pos = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([2, 1])
    with pytest.raises(RuntimeError, match=r"slot outside \[0, 10\)"):
        torch.ops.openk2.latent_attention(q, pool, slots.clone().fill_(10), pos, 16, 1.0)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        torch.ops.openk2.latent_attention(q, pool[:, :16], slots, pos, 16, 1.0)
    with pytest.raises(RuntimeError, match="both bf16 or both fp32"):
        torch.ops.openk2.latent_attention(q.bfloat16(), pool, slots, pos, 16, 1.0)
    with pytest.raises(RuntimeError, match="negative position"):
        torch.ops.openk2.latent_attention(q, pool, slots, torch.tensor([2, -1]), 16, 1.0)


def _runs_reference(q, k, v, runs, scale):
    """Causal attention run by run in float64: (out, lse, each head's max scaled score)."""
    outs, lses, tops, s0 = [], [], [], 0
    for n in runs:
        s = q[:, s0:s0 + n].double() @ k[:, s0:s0 + n].double().transpose(-1, -2) * scale
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append(s.softmax(-1) @ v[:, s0:s0 + n].double())
        lses.append(s.logsumexp(-1))
        if n:
            tops.append(s.amax((1, 2)))
        s0 += n
    return torch.cat(outs, 1), torch.cat(lses, 1), torch.stack(tops).amax(0)


def _sdpa_runs(q, k, v, runs, scale):
    """torch's fused attention run by run, in the inputs' dtype (v padded to q's head dim, as it needs)."""
    A, O, s0, outs = q.shape[-1], v.shape[-1], 0, []
    for n in runs:
        vp = torch.nn.functional.pad(v[:, s0:s0 + n], (0, A - O))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[None, :, s0:s0 + n], k[None, :, s0:s0 + n], vp[None], is_causal=True, scale=scale)[0, ..., :O])
        s0 += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("heads,A,O,runs", [(4, 48, 32, (37, 100, 1, 64, 200)),  # k2-mini's dims; ragged runs
                                            (2, 96, 64, (256,)),  # k2-small's; whole blocks
                                            (3, 20, 10, (5, 33, 0, 70))])  # no whole 32 of either dim; an empty run
def test_runs_attention_equals_attention_run_by_run(heads, A, O, runs, tiles, cpu_kernels):
    """`openk2::runs_attention` and its backward against float64 attention run by run: outputs and the
    three gradients as close as torch's own fused bf16 attention comes to the same reference, the
    log-sum-exps and the max logits to fp32's rounding (bf16 products are exact, sums in fp32)."""
    if tiles and not torch.ops.openk2.set_amx(True):
        pytest.skip("no AMX on this CPU (or Linux refused its tiles)")
    from openk2 import kernels
    torch.ops.openk2.set_amx(tiles)
    try:
        g = torch.Generator().manual_seed(heads)
        N = sum(runs)
        q, k = ((torch.randn(heads, N, A, generator=g) * 2).bfloat16() for _ in range(2))  # scores spread ~±10
        v, dout = (torch.randn(heads, N, O, generator=g).bfloat16() for _ in range(2))
        starts = torch.tensor([0, *runs]).cumsum(0)
        out, lse, top = torch.ops.openk2.runs_attention(q, k, v, starts, 0.3)
        dq, dk, dv = torch.ops.openk2.runs_attention_backward(dout, q, k, v, out, lse, starts, 0.3)
    finally:
        torch.ops.openk2.set_amx(kernels.amx_wanted())
    ref_q, ref_k, ref_v = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse, ref_top = _runs_reference(ref_q, ref_k, ref_v, runs, 0.3)
    ref_grads = torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), dout.double())
    theirs_q, theirs_k, theirs_v = (t.clone().requires_grad_() for t in (q, k, v))
    theirs = _sdpa_runs(theirs_q, theirs_k, theirs_v, runs, 0.3)
    their_grads = torch.autograd.grad(theirs, (theirs_q, theirs_k, theirs_v), dout)
    assert out.dtype == dq.dtype == torch.bfloat16 and out.shape == (heads, N, O) and dv.shape == v.shape
    for ours, ref, their in zip((out, dq, dk, dv), (ref_out.detach(), *ref_grads), (theirs, *their_grads)):
        err, their_err = ((t.double() - ref).abs().max().item() for t in (ours, their))
        assert err <= 1.5 * their_err + 1e-3, (err, their_err)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(top.double(), ref_top.detach(), rtol=1e-5, atol=1e-5)


def test_runs_attention_rejects_bad_input(cpu_kernels):
    q, v, starts = torch.randn(2, 10, 16).bfloat16(), torch.randn(2, 10, 8).bfloat16(), torch.tensor([0, 4, 10])
    op = torch.ops.openk2.runs_attention
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        op(q.float(), q.float(), v.float(), starts, 1.0)
    with pytest.raises(RuntimeError, match="from 0 to N"):
        op(q, q, v, torch.tensor([0, 4, 9]), 1.0)
    with pytest.raises(RuntimeError, match="ascend"):
        op(q, q, v, torch.tensor([0, 6, 4, 10]), 1.0)
    with pytest.raises(RuntimeError, match=r"v \[H, N, O\]"):
        op(q, q, v[:, :9].contiguous(), starts, 1.0)


@pytest.mark.parametrize("packed", [True, False], ids=["sft-packed-rows", "pretraining-rows"])
def test_training_attention_takes_the_kernel_and_equals_torchs(packed, amx, monkeypatch):
    """A training step's forward and backward (fp32 weights, bf16 autocast) with the attention in
    `openk2::runs_attention` (called once a layer) against the same step with torch's fused attention run
    by run, both measured from the step in fp32: the loss, every gradient and QK-Clip's max logits as
    close to it as torch's bf16 step comes (bf16 moves some gradients by ~30 % here, routing among them)."""
    from openk2.config import PRESETS
    from openk2.model import build_model, flash, lm_loss
    if flash.RUNS_KERNEL is None:  # registered where the tiles are, unless OPENK2_AMX=0
        pytest.skip("openk2's training attention is not registered (OPENK2_AMX=0)")
    model = build_model(PRESETS["k2-tiny"], seed=0)
    model.record_max_logits(True)
    x = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(0))
    seg = torch.tensor([[0] * 30 + [1] * 45 + [2] * 15, [0] * 70 + [1] * 20]) if packed else None
    params = [p for p in model.parameters() if p.requires_grad]

    def step(bf16=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model(x, segment_ids=seg)[:, :-1], x[:, 1:])
        return loss.item(), torch.autograd.grad(loss, params, allow_unused=True), model.max_logits()

    calls, kernel = [], flash.RUNS_KERNEL
    monkeypatch.setattr(flash, "RUNS_KERNEL", (lambda *a: calls.append(1) or kernel[0](*a), kernel[1]))
    ours = step()
    assert len(calls) == PRESETS["k2-tiny"].num_hidden_layers
    monkeypatch.setattr(flash, "RUNS_KERNEL", None)
    theirs, fp32 = step(), step(bf16=False)
    assert abs(ours[0] - fp32[0]) <= 1.25 * abs(theirs[0] - fp32[0]) + 1e-4
    for p, our, their, ref in zip(params, ours[1], theirs[1], fp32[1]):
        assert (our is None) == (ref is None)
        if ref is not None:
            assert (our - ref).norm() <= 1.25 * (their - ref).norm() + 0.01 * ref.norm() + 1e-7, p.shape
    assert (ours[2] - fp32[2]).abs().max() <= 1.25 * (theirs[2] - fp32[2]).abs().max() + 1e-3
