"""The fused vocabulary projection + cross entropy (`forward(targets=)`) against `lm_loss` of the
logits, and the per-step buffers kept between steps (`model/kept.py`)."""

import math

import pytest
import torch

from openk2.config import PRESETS
from openk2.model import build_model, head_loss, lm_loss
from openk2.model.kept import kept_empty


def _grads(model, loss):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK", 48)  # several chunks and a padded last one at test sizes
    monkeypatch.setattr(head_loss, "BLOCK_BYTES", 96 * 512 * 2)  # k2-tiny's vocabulary: bf16 blocks of 96 rows


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_and_gradients_equal_lm_loss(small_chunks, autocast):
    cfg = PRESETS["k2-tiny"]
    model = build_model(cfg, seed=3).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 71), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :9] = -100  # ignored positions: no loss, no gradient
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = lm_loss(model(x), y)
    g_ref = _grads(model, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = model(x, targets=y)
    g = _grads(model, fused)
    assert fused.dtype == torch.float32 and fused.shape == ()
    assert set(g) == set(g_ref)
    if not autocast:
        torch.testing.assert_close(fused, ref, rtol=1e-6, atol=0)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-8, msg=name)
    else:  # the same bf16 products; the weight's gradient sums per-chunk products (one rounding each)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
        assert _rel(g["lm_head.weight"], g_ref["lm_head.weight"]) < 0.01
        assert _rel(g["model.norm.weight"], g_ref["model.norm.weight"]) < 1e-3
        assert max(_rel(g[n], g_ref[n]) for n in g_ref) < 0.03  # bf16 noise of a random model, far below
        # its distance from fp32 (tests above: the two paths agree to 1e-4 when products are exact)


def test_fused_loss_packed_rows_and_keep_agree(small_chunks):
    """Packed rows (segment_ids) with targets: the loss of the kept rows' logits (`keep=`)."""
    cfg = PRESETS["k2-tiny"]
    model = build_model(cfg, seed=1).train()
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    seg = torch.tensor([[1] * 15 + [2] * 25, [3] * 32 + [0] * 8])
    y = torch.where(seg == 0, -100, torch.roll(x, -1, 1))
    keep = y != -100
    ref = lm_loss(model(x, segment_ids=seg, keep=keep), y[keep])
    torch.testing.assert_close(model(x, segment_ids=seg, targets=y), ref, rtol=1e-6, atol=0)


def test_scaled_loss_scales_the_gradients_and_no_grad_computes_none(small_chunks):
    cfg = PRESETS["k2-tiny"]
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    g1 = _grads(model, model(x, targets=y))
    g_half = _grads(model, model(x, targets=y) * 0.5)  # accumulation divides the loss: d_loss = 0.5
    for name in g1:
        torch.testing.assert_close(g_half[name], g1[name] * 0.5, rtol=1e-5, atol=1e-9)
    made = []
    real = head_loss.kept_empty
    head_loss.kept_empty = lambda *a: made.append(a[1]) or real(*a)
    try:
        with torch.no_grad():  # evaluation: the loss alone, no gradient computed
            loss = model(x, targets=y)
    finally:
        head_loss.kept_empty = real
    assert made == [] and not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, lm_loss(model(x), y).detach(), rtol=1e-6, atol=0)


def test_no_target_left_gives_nan_as_cross_entropy():
    cfg = PRESETS["k2-tiny"]
    model = build_model(cfg, seed=0)
    x = torch.randint(0, cfg.vocab_size, (1, 5))
    assert math.isnan(model(x, targets=torch.full((1, 5), -100)).item())
    assert math.isnan(lm_loss(model(x), torch.full((1, 5), -100)).item())


def test_kept_memory_is_reused_only_when_free():
    owner = torch.zeros(3, 4)
    a = kept_empty(owner, "grad", (3, 4), torch.float32)
    ptr = a.data_ptr()
    b = kept_empty(owner, "grad", (3, 4), torch.float32)  # a still holds the storage: a new one
    b_ptr = b.data_ptr()
    assert b_ptr != ptr
    view = b[1]  # a view keeps b's storage alive after b is gone
    del b
    c = kept_empty(owner, "grad", (3, 4), torch.float32)
    assert c.data_ptr() not in (b_ptr, ptr)
    del a, view
    c_ptr = c.data_ptr()
    del c
    d = kept_empty(owner, "grad", (3, 4), torch.float32)  # the slot's last storage, free now: reused
    assert d.data_ptr() == c_ptr
    e = kept_empty(owner, "cast", (3, 4), torch.bfloat16)  # another slot: memory of its own
    assert d.untyped_storage().data_ptr() != e.untyped_storage().data_ptr()
    del d
    t = kept_empty(owner, "grad", (2, 6), torch.float32)  # same bytes: reused, reshaped
    assert t.shape == (2, 6) and t.data_ptr() == c_ptr
    del t
    assert kept_empty(owner, "grad", (5,), torch.float32).data_ptr() == c_ptr  # fewer: its start
    assert kept_empty(owner, "grad", (20,), torch.float32).data_ptr() != c_ptr  # more: a new one


def test_gradients_on_kept_memory_survive_accumulation_and_holders():
    """The experts' weight gradients live on kept memory: accumulating two backwards sums them, and a
    gradient the caller still holds is never written over by the next step's."""
    cfg = PRESETS["k2-tiny"]
    model = build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(4))
    x, y = ids[:, :-1], ids[:, 1:]
    stacks = [p for n, p in model.named_parameters() if "experts.gate_up_proj" in n]

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, targets=y)
    loss().backward()
    once = [p.grad.clone() for p in stacks]
    held = [p.grad for p in stacks]  # the caller keeps them past zero_grad
    model.zero_grad(set_to_none=True)
    loss().backward()
    loss().backward()  # accumulated: twice the gradient
    for p, g, h in zip(stacks, once, held):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(h, g, rtol=0, atol=0)  # untouched
    model.zero_grad(set_to_none=True)
    del held
    loss().backward()
    for p, g in zip(stacks, once):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_avoided_targets_are_unlikelihood_rows(small_chunks, autocast):
    """A target t <= AVOID: -log(1 - p) of the token AVOID - t, beside ordinary rows and ignored ones, in
    several chunks and blocks (bf16: the last one padded); loss and gradients against the same computed
    from the whole logits."""
    cfg = PRESETS["k2-tiny"]
    model = build_model(cfg, seed=5).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 71), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :9] = -100
    avoid = torch.zeros_like(y, dtype=torch.bool)
    avoid[0, 20:25], avoid[1, 3], avoid[1, 60:] = True, True, True
    y[avoid] = head_loss.AVOID - y[avoid]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp = torch.log_softmax(model(x).float(), -1)
    keep = y != -100
    tok = torch.where(avoid, head_loss.AVOID - y, y).clamp(min=0)
    lp = logp.gather(-1, tok[..., None])[..., 0]
    ref = torch.where(avoid, -torch.log1p(-lp.exp()), -lp)[keep].mean()
    g_ref = _grads(model, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = model(x, targets=y)
    g = _grads(model, fused)
    if not autocast:
        torch.testing.assert_close(fused, ref, rtol=1e-6, atol=0)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-8, msg=name)
    else:  # as in the test above: the same bf16 products, the weight's gradient summed per block
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
        assert _rel(g["lm_head.weight"], g_ref["lm_head.weight"]) < 0.01
        assert max(_rel(g[n], g_ref[n]) for n in g_ref) < 0.03
    y_plain = torch.where(avoid, -100, y)  # without avoided rows the loss is the plain one of the rest
    assert model(x, targets=y_plain).item() == pytest.approx(lm_loss(model(x), y_plain).item(), rel=1e-6)


@pytest.mark.parametrize("gap", [0.0, 12.0, 30.0])
def test_an_avoided_token_near_certain_keeps_its_loss_and_gradient(gap):
    """p_a from ~1/V to 1 - 6e-12: the loss and the logits' gradient equal float64's
    -log(1 - p_a) and (p_a / (1 - p_a))·(onehot_a - p), where 1 - p_a computed in fp32 would be 0."""
    V, D, a = 64, 8, 5
    h = torch.zeros(3, D)
    h[:, 0] = 1.0
    w = torch.randn(V, D, generator=torch.Generator().manual_seed(0)) * 0.1
    w[a, 0] += gap  # row a's logit `gap` above the rest
    w.requires_grad_(True)
    t = torch.tensor([head_loss.AVOID - a, 7, head_loss.AVOID - a])
    loss = head_loss.LinearCrossEntropy.apply(h, w, t, torch.float32, True)
    loss.backward()
    z = (h.double() @ w.detach().double().T)
    p = z.softmax(-1)
    rest = torch.cat([z[:, :a], z[:, a + 1:]], -1).logsumexp(-1)
    lossd = torch.stack([z[0].logsumexp(-1) - rest[0], -p[1, 7].log(), z[2].logsumexp(-1) - rest[2]])
    g = p.clone()
    g[1, 7] -= 1
    for r in (0, 2):
        c = p[r, a] / torch.exp(rest[r] - z[r].logsumexp(-1))  # 1 - p_a, exactly
        g[r] = c * (torch.nn.functional.one_hot(torch.tensor(a), V).double() - p[r])
    assert loss.item() == pytest.approx(lossd.mean().item(), rel=1e-5)
    torch.testing.assert_close(w.grad.double(), (g / 3).T @ h.double(), rtol=1e-4, atol=1e-7)
    assert math.isfinite(loss.item()) and w.grad.abs().max() < 2
