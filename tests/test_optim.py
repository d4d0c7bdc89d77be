"""MuonClip tests: Newton–Schulz and the update scale as functions, the sharded Muon step against the
per-matrix reference (1 process and 2 gloo processes), QK-Clip on the tiny model (q latent or not),
the WSD schedule, and a short end-to-end run."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import openk2.optim.muon as muon_mod
from openk2.config import PRESETS
from openk2.model import build_model, lm_loss
from openk2.optim import (K2_WSD, Muon, apply_qk_clip, match_adamw_rms, muon_param_groups, muon_update,
                          newton_schulz, qk_clip_factors, reduce_max_logits, wsd_lr)

TINY = PRESETS["k2-tiny"]
LR, WD = 0.02, 0.1


# --- Newton–Schulz and the update scale ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (5, 32, 64)])
def test_newton_schulz_is_near_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    O = newton_schulz(G)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    sv = torch.linalg.svdvals(O.float())
    # the quintic overshoots by design: singular values in ~[0.7, 1.2], not exactly 1
    assert sv.min() > 0.6 and sv.max() < 1.2, (sv.min(), sv.max())
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonalisation U Vᵀ
    cos = (O.float() * polar).sum((-2, -1)) / (O.float().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert cos.min() > 0.97
    if G.ndim == 3:  # a stack is orthogonalised one matrix at a time
        for i in range(G.shape[0]):
            torch.testing.assert_close(O[i], newton_schulz(G[i]), atol=0, rtol=0)


@pytest.mark.parametrize("tall", [False, True])
def test_newton_schulz_stays_within_bf16_rounding_of_the_fp64_iteration(tall):
    """The same five quintic steps in fp64 are the reference; bf16 products may only add rounding.
    Measured 0.8 % relative error (a·I folded into the bf16 polynomial, a faster plain bmm, gave
    2.1 %; the common a·X + B@X in bf16 gives 1.7 %). A tall stack (iterated on its right, nothing
    transposed) is the wide one's transpose, to the same rounding."""
    torch.manual_seed(0)
    G = torch.randn(8, 256, 512) * torch.logspace(-3, 1, 512)  # a spread spectrum
    a, b, c = muon_mod.NS_COEFFS
    X = G.double() / (G.double().norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        M = X @ X.mT
        X = a * X + (b * M + c * M @ M) @ X
    O = newton_schulz(G.mT.contiguous()).mT if tall else newton_schulz(G)
    err = (O.double() - X).norm() / X.norm()
    assert err < 0.01, err


@pytest.mark.parametrize("shape", [(3, 40, 24), (3, 24, 40), (1, 8, 8)])
def test_newton_schulz_in_a_scratch_equals_it_without(shape):
    """The optimizer's path (temporaries kept in a Scratch, G free to be normalised in place, chunks
    smaller than the stack) gives the reference's numbers bit for bit, and reuses the scratch's memory."""
    torch.manual_seed(0)
    G = torch.randn(*shape)
    want = newton_schulz(G)
    scratch, mp_ = muon_mod.Scratch(), pytest.MonkeyPatch()
    mp_.setattr(muon_mod, "NS_CHUNK_BYTES", 2 * 24 * 40 * 2)  # two matrices a chunk: 2 chunks for 3
    try:
        got = newton_schulz(G.clone(), scratch=scratch, scale_G=True)
        assert torch.equal(got, want)
        ptrs = {k: t.data_ptr() for k, t in scratch.flat.items()}
        again = newton_schulz(G.clone(), scratch=scratch, scale_G=True)
        assert torch.equal(again, want) and {k: t.data_ptr() for k, t in scratch.flat.items()} == ptrs
        assert again.data_ptr() in ptrs.values()
    finally:
        mp_.undo()
    assert torch.equal(newton_schulz(G, 0), (G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)).bfloat16())


def test_muon_keeps_its_scratch_between_steps_on_cpu_only():
    """On CPU the step's temporaries stay for the next step (fresh pages fault in); elsewhere (here the
    meta device, standing in for a GPU, whose caching allocator reuses memory) they are let go."""
    for device, kept in (("cpu", True), ("meta", False)):
        w = torch.nn.Parameter(torch.randn(48, 32, device=device))
        w.grad = torch.randn(48, 32, device=device)
        opt = Muon([dict(params=[w], algo="muon", matrix=None)], lr=1e-2)
        opt.step()
        assert bool(opt.scratch.flat) == kept and (not kept or "update" in opt.scratch.flat)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_step_equals_the_reference_with_and_without_nesterov(nesterov):
    """Two steps of the optimizer (its scratch reused) equal muon_update on every Muon matrix."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 32))
    opt = Muon([dict(params=[w], algo="muon", matrix=None)], lr=1e-2, weight_decay=0.1, nesterov=nesterov)
    want, buf = w.detach().clone(), torch.zeros(48, 32)
    for _ in range(2):
        w.grad = torch.randn(48, 32)
        want = want * (1 - 1e-3) - 1e-2 * muon_update(w.grad.clone(), buf, nesterov=nesterov)
        opt.step()
        torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[w]["momentum_buffer"], buf, rtol=0, atol=0)


def test_muon_batches_one_matrix_parameters_of_a_shape_on_cpu(monkeypatch):
    """At world size 1 on CPU, same-shape parameters of one matrix each share a Newton–Schulz call, up to
    NS_CHUNK_BYTES (here 3 of 48×32 a batch: 5 -> 3 + 2; a stack apart); each update stays muon_update's."""
    monkeypatch.setattr(muon_mod, "NS_CHUNK_BYTES", 3 * 2 * 48 * 32)
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(48, 32)) for _ in range(5)]
    stack = torch.nn.Parameter(torch.randn(2, 48, 32))
    groups = [dict(params=ws[:2] + [stack] + ws[2:], algo="muon", matrix=(48, 32))]
    items = [(p, groups[0]) for p in groups[0]["params"]]
    names = {id(p): str(i) for i, p in enumerate(ws)} | {id(stack): "stack"}
    assert [[names[id(p)] for p, _ in b] for b in muon_mod._batches(items, 48, 32)] \
        == [["0", "1"], ["stack"], ["2", "3", "4"]]
    opt = Muon(groups, lr=1e-2, weight_decay=0.1)
    calls = []
    real = muon_mod.newton_schulz
    monkeypatch.setattr(muon_mod, "newton_schulz", lambda G, *a, **k: calls.append(G.shape[0]) or real(G, *a, **k))
    params = ws + [stack]
    want, bufs = [p.detach().clone() for p in params], [torch.zeros_like(p) for p in params]
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        want = [w * (1 - 1e-3) - 1e-2 * muon_update(p.grad.clone(), b) for w, p, b in zip(want, params, bufs)]
        calls.clear()
        opt.step()
        assert calls == [2, 2, 3]  # matrices per call
        for p, w, b in zip(params, want, bufs):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)


def _twin_steps(monkeypatch, a, b, opts, steps: int, name: str, replacement):
    """Step opts[0] over params a as it is and opts[1] over their copies b with muon_mod.<name> replaced,
    on the same random gradients; yields after each step."""
    for _ in range(steps):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opts[0].step()
        with monkeypatch.context() as m:
            m.setattr(muon_mod, name, replacement)
            opts[1].step()
        yield


@pytest.mark.parametrize("nesterov", [True, False])
def test_kernel_step_equals_the_torch_ops_bit_for_bit(monkeypatch, nesterov, cpu_kernels):
    """Muon's elementwise passes through openk2's kernels (momentum, the normalised bf16 copy, the update
    from bf16) give the torch ops' numbers exactly: weights and momentum, over steps, for a stack, a
    batch of wide and of tall matrices, and sizes that are no multiple of a vector."""
    torch.manual_seed(2)
    shapes = [(3, 40, 24), (24, 40), (24, 40), (40, 24), (40, 24), (7, 9)]
    a = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opts = [Muon([dict(params=ps[:1], algo="muon", matrix=(40, 24), nesterov=nesterov),
                  dict(params=ps[1:], algo="muon", matrix=None, nesterov=nesterov)], lr=1e-2, weight_decay=0.1)
            for ps in (a, b)]
    used = []
    real = muon_mod._kernel

    def counting(name, *args, **kw):
        op = real(name, *args, **kw)
        used.extend([name] if op else [])
        return op
    monkeypatch.setattr(muon_mod, "_kernel", counting)
    for _ in _twin_steps(monkeypatch, a, b, opts, 3, "_kernel", lambda *args, **kw: None):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        assert all(torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])
                   for p, q in zip(a, b))
    assert {"muon_momentum", "scale_to_bf16", "muon_apply"} <= set(used)


def test_a_step_marks_the_weights_changed_for_autograd():
    """A graph that saved a weight cannot back-propagate after the step changed it, through the kernels as
    through torch's in-place ops: autograd's version check fires."""
    w = torch.nn.Parameter(torch.randn(24, 40))
    opt = Muon([dict(params=[w], algo="muon", matrix=None)], lr=1e-2)
    loss = (w * w).sum()  # saves w
    w.grad = torch.randn_like(w)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_kernels_round_to_bf16_as_torch_does(cpu_kernels):
    """The normalised copy rounds to nearest even, keeps inf and writes NaN as torch does; the update
    takes fp32 addends too; a wrong dtype or size is an error, not a misread buffer."""
    op = torch.ops.openk2
    src = torch.tensor([[[1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3e38, float("inf"), float("nan"), 1e-40]]])
    inv = torch.tensor([1.0])
    dst = torch.empty(src.shape, dtype=torch.bfloat16)
    op.scale_to_bf16(src, inv, dst)
    want = src.to(torch.bfloat16)
    assert torch.equal(dst.view(torch.int16), want.view(torch.int16))
    p, o = torch.randn(37), torch.randn(37)
    ref = p.clone().mul_(0.99).add_(o, alpha=-0.5)
    op.muon_apply(p, o, 0.99, -0.5)
    assert torch.equal(p, ref)
    with pytest.raises(RuntimeError, match="fp32"):
        op.muon_apply(p.double(), o, 0.99, -0.5)
    with pytest.raises(RuntimeError, match="size"):
        op.muon_momentum(p, torch.zeros(36), torch.zeros(37), 0.9, True)


def test_batched_updates_equal_each_matrix_alone_bit_for_bit(monkeypatch):
    """The same two steps with one-matrix parameters batched and each alone: the same weights, exactly
    (Newton–Schulz normalises and multiplies each matrix of a batch on its own)."""
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(48, 32)] * 4 + [(32, 48)] * 3]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opts = [Muon([dict(params=ps, algo="muon", matrix=None)], lr=1e-2, weight_decay=0.1) for ps in (a, b)]
    for _ in _twin_steps(monkeypatch, a, b, opts, 2, "_batches", lambda items, A, B: [[item] for item in items]):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("shape", [(256, 128), (64, 512), (32, 64), (512, 1536)])
def test_update_rms_matches_adamw(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    upd = muon_update(G, torch.zeros_like(G))
    rms = upd.pow(2).mean().sqrt().item()
    assert 0.15 < rms < 0.22, rms  # 0.2 for exactly orthogonal; the quintic's S' lands a bit below
    assert upd.dtype == torch.float32
    O = newton_schulz(G).float()
    torch.testing.assert_close(match_adamw_rms(O), O * 0.2 * math.sqrt(max(shape)))


# --- groups and the sharded step against the reference -------------------------------------------
def test_param_groups():
    model = build_model(TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = muon_param_groups(model)
    where = {names[id(p)]: (g["algo"], g.get("matrix")) for g in groups for p in g["params"]}
    assert len(where) == len(names)  # every parameter in exactly one group
    F, D = TINY.moe_intermediate_size, TINY.hidden_size
    assert where["model.layers.1.mlp.experts.gate_up_proj"] == ("muon", (F, D))
    assert where["model.layers.1.mlp.experts.down_proj"] == ("muon", (D, F))
    assert where["model.layers.0.self_attn.kv_b_proj.weight"] == ("muon", None)
    assert where["model.layers.1.mlp.shared_experts.up_proj.weight"] == ("muon", None)
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]:
        assert where[name][0] == "adamw", name
    assert not any("e_score_correction_bias" in n for n in where)  # a buffer: no optimizer touches it
    router = model.layers[1].mlp.gate.weight
    assert any(router is p for g in muon_param_groups(model, router_in_muon=True) if g["algo"] == "muon"
               for p in g["params"])


def fake_grads(model, step: int):
    """Deterministic gradients, the same in every process (as if DDP had averaged them)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01


def reference_step(model, bufs, adamw, lr, wd):
    """The specification: every matrix (each expert's gate, up and down separately) on its own."""
    for g in muon_param_groups(model):
        if g["algo"] == "adamw":
            continue
        for p in g["params"]:
            A, B = g["matrix"] or p.shape
            buf = bufs.setdefault(p, torch.zeros_like(p))
            for w, gr, b in zip(p.data.view(-1, A, B), p.grad.view(-1, A, B), buf.view(-1, A, B)):
                w.mul_(1 - lr * wd).add_(muon_update(gr, b), alpha=-lr)
    adamw.step()


def run_steps(model, steps: int):
    opt = Muon(muon_param_groups(model), lr=LR, weight_decay=WD)
    for step in range(steps):
        fake_grads(model, step)
        opt.step()
    return opt


def test_step_equals_per_matrix_reference():
    model = build_model(TINY, seed=0)
    ref = copy.deepcopy(model)
    run_steps(model, 3)
    adamw_params = next(g["params"] for g in muon_param_groups(ref) if g["algo"] == "adamw")
    adamw = torch.optim.AdamW(adamw_params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    bufs = {}
    for step in range(3):
        fake_grads(ref, step)
        with torch.no_grad():
            reference_step(ref, bufs, adamw, LR, WD)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)  # measured: bit-identical on CPU


def test_state_dict_resumes_exactly():
    a = build_model(TINY, seed=0)
    opt_a = run_steps(a, 2)
    b = copy.deepcopy(a)
    opt_b = Muon(muon_param_groups(b), lr=LR, weight_decay=WD)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a copy, as from disk (load shares tensors)
    for model, opt in ((a, opt_a), (b, opt_b)):
        fake_grads(model, 2)
        opt.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def _counting_newton_schulz(counted: list):
    """newton_schulz that also records how many matrices it was given."""
    real = muon_mod.newton_schulz
    return lambda G, steps=5, **kw: (counted.append(G.shape[0]), real(G, steps, **kw))[1]


def _worker(rank: int, out_dir: str, kernels: bool = True):
    # a file rendezvous: no TCP port to pick (a free port can be taken again before the workers bind)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        counted = []
        muon_mod.newton_schulz = _counting_newton_schulz(counted)  # a fresh process: no need to undo
        if not kernels:
            muon_mod._kernel = lambda *args, **kw: None
        model = build_model(TINY, seed=0)
        run_steps(model, 3)
        logits_LH = torch.tensor([[[1.0, 7.0], [3.0, 2.0]], [[5.0, 1.0], [2.0, 9.0]]])[rank]
        torch.save(dict(state=model.state_dict(), matrices=sum(counted),
                        logits=reduce_max_logits(logits_LH)), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2)
    single = build_model(TINY, seed=0)
    counted = []
    monkeypatch.setattr(muon_mod, "newton_schulz", _counting_newton_schulz(counted))
    run_steps(single, 3)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, want in single.state_dict().items():
        torch.testing.assert_close(r0["state"][name], want, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(r1["state"][name], r0["state"][name], atol=0, rtol=0, msg=name)
    # the orthogonalisation is split, not duplicated: each rank did about half of the matrices
    assert r0["matrices"] + r1["matrices"] == sum(counted)
    assert min(r0["matrices"], r1["matrices"]) > 0.4 * sum(counted)
    torch.testing.assert_close(r0["logits"], torch.tensor([[5.0, 7.0], [3.0, 9.0]]))
    torch.testing.assert_close(r1["logits"], r0["logits"])


def test_two_gloo_processes_step_alike_with_and_without_kernels(tmp_path, cpu_kernels):
    """Each rank applies the all-gathered bf16 updates (and normalises its share) through openk2's kernels
    as through torch's ops: the same weights, bit for bit."""
    for kernels in (True, False):
        (tmp_path / str(kernels)).mkdir()
        mp.spawn(_worker, args=(str(tmp_path / str(kernels)), kernels), nprocs=2)
    on, off = (torch.load(tmp_path / str(k) / "rank1.pt")["state"] for k in (True, False))
    assert all(torch.equal(on[name], off[name]) for name in on)


def _clip_logits(cfg) -> torch.Tensor:
    """[L, H] max logits over τ = 5 at some heads of some layers."""
    logits = torch.full((cfg.num_hidden_layers, cfg.num_attention_heads), 3.0)
    logits[0, 1], logits[2, 0], logits[2, 3] = 8.0, 50.0, 6.0
    return logits


def _rows_worker(rank: int, out_dir: str):
    """Muon and QK-Clip over a model `fully_shard`ed by rows over 3 processes (FSDP2; uneven chunks). Saves
    the whole weights after sharding and after the steps, and each step's whole gradients, as the ranks
    hold them (gathered back from the shards)."""
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=3)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor
        counted = []
        muon_mod.newton_schulz = _counting_newton_schulz(counted)
        model = build_model(TINY, seed=0)
        mesh = init_device_mesh("cpu", (3,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def whole(tensors):
            return {n: getattr(t, "full_tensor", lambda t=t: t)().clone() for n, t in tensors}

        start = whole(model.state_dict().items())
        opt = Muon(muon_param_groups(model), lr=LR, weight_decay=WD)
        grads = []
        for step in range(3):
            gen = torch.Generator().manual_seed(1000 + step)  # fake_grads' gradients, each rank its rows
            for p in model.parameters():
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen) * 0.01, mesh, p.placements)
            grads.append(whole((n, p.grad) for n, p in model.named_parameters()))
            opt.step()
        clipped = apply_qk_clip(model, _clip_logits(TINY), 5.0)
        kv = model.layers[2].self_attn.kv_b_proj.weight
        buf = opt.state[kv]["momentum_buffer"]
        rows = (buf.to_local().shape[0], buf.shape[0], type(buf).__name__)
        torch.save(dict(start=start, grads=grads, state=whole(model.state_dict().items()), matrices=sum(counted),
                        clipped=clipped, rows=rows), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rows_sharded_muon_and_qk_clip_equal_one_process(tmp_path, monkeypatch):
    """FSDP2's DTensor parameters: each whole matrix orthogonalised once, on one rank, its rows sent
    back; momentum and AdamW state sharded like the weights; QK-Clip scales each rank's own rows. Three
    processes (uneven row blocks) end where one process does that starts from the weights and takes the
    gradients the ranks held (so what torch's sharding does to them on a given CPU is not the question
    here), to 1e-5: a step moves a weight by ~lr = 0.02, a wrong row block or a stale state by as much, the
    rounding of a row block's elementwise passes by ~1e-8; the ranks agree with each other bit for bit."""
    mp.spawn(_rows_worker, args=(str(tmp_path),), nprocs=3)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    single = build_model(TINY, seed=0)
    single.load_state_dict(ranks[0]["start"])
    counted = []
    monkeypatch.setattr(muon_mod, "newton_schulz", _counting_newton_schulz(counted))
    opt = Muon(muon_param_groups(single), lr=LR, weight_decay=WD)
    for grads in ranks[0]["grads"]:
        for name, p in single.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
    assert apply_qk_clip(single, _clip_logits(TINY), 5.0) == 3
    for name, want in single.state_dict().items():
        got = ranks[0]["state"][name]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.equal(got, ranks[0]["start"][name]) or "bias" in name, name  # every weight moved
        for r in ranks[1:]:
            assert torch.equal(r["state"][name], got), name
    assert sum(r["matrices"] for r in ranks) == sum(counted) and min(r["matrices"] for r in ranks) > 0
    assert [r["clipped"] for r in ranks] == [3, 3, 3]
    local, whole, kind = ranks[0]["rows"]
    assert kind == "DTensor" and local == -(-whole // 3)  # the state holds this rank's rows only


# --- QK-Clip ---------------------------------------------------------------------------------------
def test_qk_clip_factors():
    s = torch.tensor([50.0, 100.0, 250.0, -3.0, float("-inf")])
    torch.testing.assert_close(qk_clip_factors(s, 100.0), torch.tensor([1.0, 1.0, 0.4, 1.0, 1.0]))


def _q_weight(attn):
    return (attn.q_b_proj if attn.cfg.q_lora_rank else attn.q_proj).weight


@pytest.mark.parametrize("q_lora_rank", [TINY.q_lora_rank, None])
def test_qk_clip_bounds_clipped_heads_and_leaves_the_rest(q_lora_rank):
    cfg = dataclasses.replace(TINY, q_lora_rank=q_lora_rank)
    H, P, R, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    tau = 5.0
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # blow up heads 0 and 2 of layers 0 and 2, both logit terms
        for i in (0, 2):
            attn = model.layers[i].self_attn
            w_q = _q_weight(attn).view(H, P + R, -1)
            w_q[[0, 2]] *= 40.0
            attn.kv_b_proj.weight.view(H, -1, C)[[0, 2], :P] *= 40.0
    inputs = {}  # each layer's attention input, to recompute its logits on exactly the same batch
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args))
             for i, layer in enumerate(model.layers)]
    model.record_max_logits(True)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 24)))
    for h in hooks:
        h.remove()
    before_LH = model.max_logits().clone()
    assert (before_LH[[0, 2]][:, [0, 2]] > tau).all() and (before_LH[:, [1, 3]] < tau).all()
    old = copy.deepcopy(model.state_dict())
    assert apply_qk_clip(model, before_LH, tau) == 4

    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        with torch.no_grad():
            attn(*inputs[i])
        after_H, clipped = attn.max_logits, before_LH[i] > tau
        assert (after_H[clipped] <= tau * (1 + 1e-5)).all() and (after_H[clipped] >= tau * (1 - 1e-4)).all()
        assert torch.equal(after_H[~clipped], before_LH[i][~clipped])
        pre = f"model.layers.{i}.self_attn."
        q_name = "q_b_proj.weight" if q_lora_rank else "q_proj.weight"
        for name, rows in [(q_name, P + R), ("kv_b_proj.weight", P + cfg.v_head_dim)]:
            new, was = attn.state_dict()[name].view(H, rows, -1), old[pre + name].view(H, rows, -1)
            assert torch.equal(new[~clipped], was[~clipped])  # untouched heads: bit-identical
            if name.startswith("kv_b"):
                assert torch.equal(new[:, P:], was[:, P:])  # values never scaled
            g = qk_clip_factors(before_LH[i], tau)[clipped][:, None, None]
            torch.testing.assert_close(new[clipped, :P], was[clipped, :P] * g.sqrt())
            if name == q_name:
                torch.testing.assert_close(new[clipped, P:], was[clipped, P:] * g)
        # the shared rotary key (kv_a_proj_with_mqa rows C:) and everything else never changes
        for name in ["kv_a_proj_with_mqa.weight", "o_proj.weight", "kv_a_layernorm.weight",
                     *(["q_a_proj.weight", "q_a_layernorm.weight"] if q_lora_rank else [])]:
            assert torch.equal(attn.state_dict()[name], old[pre + name]), name


# --- schedule ----------------------------------------------------------------------------------------
def test_wsd_shape():
    kw = dict(peak=2e-4, warmup=10, stable=20, decay=40, final=2e-5)
    lrs = [wsd_lr(s, **kw) for s in range(100)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-4) and lrs[10] == 2e-4
    assert all(lr == 2e-4 for lr in lrs[10:31])
    decay = lrs[30:71]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly down along the cosine
    assert lrs[50] == pytest.approx((2e-4 + 2e-5) / 2)  # half-way: the midpoint
    assert all(lr == pytest.approx(2e-5) for lr in lrs[70:])  # held at final
    flat = [wsd_lr(s, peak=1.0, warmup=0, stable=9, decay=0, final=0.1) for s in range(10)]
    assert flat == [1.0] * 9 + [0.1]  # no decay: the peak until the last step (was `final` throughout)
    assert K2_WSD["warmup"] + K2_WSD["stable"] + K2_WSD["decay"] == pytest.approx(231_000, rel=0.01)


# --- end to end ----------------------------------------------------------------------------------------
def test_muonclip_trains_tiny_model():
    """20 steps on one random batch (memorisation); τ is set low enough that QK-Clip fires."""
    torch.manual_seed(0)
    model = build_model(TINY, seed=0)
    opt = Muon(muon_param_groups(model), lr=0.01, weight_decay=0.1)
    ids = torch.randint(0, TINY.vocab_size, (4, 33))
    model.record_max_logits(True)
    losses, clipped = [], 0
    for _ in range(20):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        clipped += apply_qk_clip(model, reduce_max_logits(model.max_logits()), tau=0.2)
        losses.append(loss.item())
    assert clipped > 0
    assert losses[-1] < 0.5 * losses[0], losses


def test_muon_steps_experts_wider_than_the_model():
    """Experts whose hidden width exceeds the model's (tall gate/up matrices) step like any other:
    the sharded step at world size 1 equals the single-matrix reference."""
    cfg = dataclasses.replace(PRESETS["k2-tiny"], moe_intermediate_size=96)
    model = build_model(cfg, seed=0)
    lm_loss(model(torch.randint(0, 256, (2, 16))), torch.randint(0, 256, (2, 16))).backward()
    p = model.layers[1].mlp.experts.gate_up_proj
    E, F2, D = p.shape
    want = p.detach() * (1 - 1e-2 * 0.1) - 1e-2 * muon_update(
        p.grad.clone().view(2 * E, F2 // 2, D), torch.zeros(2 * E, F2 // 2, D)).reshape(p.shape)
    Muon(muon_param_groups(model), lr=1e-2, weight_decay=0.1).step()
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)
