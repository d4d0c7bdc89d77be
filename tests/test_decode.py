"""The decode step (`Transformer.decode`, compiled by engine/decode.py) against its reference, the
model's own forward (`Transformer.decode_reference`): logits and the cache rows it writes, in both
batch regimes, eager and through torch.compile, float and int8 (read through the linears' face)."""

import pytest
import torch

from openk2.config import PRESETS
from openk2.engine import SamplingParams, generate
from openk2.engine.decode import CompiledDecode, compilable
from openk2.engine.kv_cache import BlockPool
from openk2.model import build_model, linear
from openk2.model.moe import small_batch
from openk2.quant import quantize_model

CFG = PRESETS["k2-tiny"]


@pytest.fixture(scope="module")
def tiny():
    return build_model(CFG, seed=4).eval()


def _pool_with_prompts(model, lengths, cfg=CFG):
    """A block pool holding one prefilled prompt per row; returns pool, tables, next ids, positions."""
    pool = BlockPool(cfg, 64, block_size=4, dtype=model.lm_head.weight.dtype)
    gen = torch.Generator().manual_seed(len(lengths))
    tables = []
    with torch.inference_mode():
        for n in lengths:
            table = []
            pool.grow(table, n + 8)
            cache = pool.gather([table], n)
            model(torch.randint(0, CFG.vocab_size, (1, n), generator=gen), 0, cache)
            pool.scatter(cache, [table], [0], [n])
            tables.append(table)
    ids = torch.randint(0, CFG.vocab_size, (len(lengths),), generator=gen)
    return pool, tables, ids, torch.tensor(lengths)


@pytest.mark.parametrize("lengths", [[7], [3, 11], [5, 1, 9, 14, 2]])
def test_decode_step_equals_forward_and_writes_the_same_rows(tiny, lengths):
    assert small_batch(len(lengths), CFG) == (len(lengths) <= 2)  # both regimes covered
    pool, tables, ids, pos = _pool_with_prompts(tiny, lengths)
    slots = pool.slots(tables, max(lengths) + 1)
    ref_rows = [r.clone() for r in pool.rows]
    with torch.inference_mode():
        expect = tiny.decode_reference(ids, pos, slots, ref_rows)
        got = tiny.decode(ids, pos, slots, pool.rows)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    for a, b in zip(pool.rows, ref_rows):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(pool.rows[0], _pool_with_prompts(tiny, lengths)[0].rows[0])  # rows written


@pytest.mark.parametrize("kernels", [True, False])
def test_decode_step_past_small_batches_with_and_without_kernels(tiny, kernels, monkeypatch, request):
    """Past small batches the step's attention goes through openk2::latent_attention where it is built,
    else library matmuls (`MLA._decode_rows`): both equal the reference."""
    from openk2.model import attention
    if kernels:
        request.getfixturevalue("cpu_kernels")
        assert torch.float32 in attention.LATENT_KERNELS
    else:
        monkeypatch.setattr(attention, "LATENT_KERNELS", {})
    pool, tables, ids, pos = _pool_with_prompts(tiny, [5, 1, 9, 14, 2])
    slots = pool.slots(tables, 15)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        expect = tiny.decode_reference(ids, pos, slots, [r.clone() for r in pool.rows])
        got = tiny.decode(ids, pos, slots, pool.rows)
    assert ("openk2::latent_attention" in {e.name for e in prof.events()}) == kernels
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [
    dict(q_lora_rank=None, n_shared_experts=0),  # q_proj; routed experts only
    dict(n_group=4, topk_group=2, scoring_func="softmax", first_k_dense_replace=2)])
def test_decode_step_family_variants(variant):
    """The same binding on other DeepSeek-V3-family shapes (eager: the math, not the compiler)."""
    import dataclasses
    cfg = dataclasses.replace(CFG, **variant)
    model = build_model(cfg, seed=5).eval()
    pool, tables, ids, pos = _pool_with_prompts(model, [4, 10, 7], cfg)
    slots = pool.slots(tables, 11)
    for rows in (slice(0, 1), slice(0, 3)):  # both regimes
        with torch.inference_mode():
            expect = model.decode_reference(ids[rows], pos[rows], slots[rows], [r.clone() for r in pool.rows])
            got = model.decode(ids[rows], pos[rows], slots[rows], [r.clone() for r in pool.rows])
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_compiled_step_equals_reference():
    """One row and four (past `small_batch`: library matmuls and dense experts, in fp32)."""
    tiny = build_model(CFG, seed=4).eval()  # a model of its own: its graphs start empty
    compiled = CompiledDecode(tiny)
    # each regime again once its graph has run: the calls that check only the guards telling the
    # graphs apart (CompiledDecode._guards) still pick the right one
    for lengths in ([6], [4, 9, 2, 12], [5], [3, 8, 1, 7]):
        pool, tables, ids, pos = _pool_with_prompts(tiny, lengths)
        slots = pool.slots(tables, max(lengths) + 1)
        ref_rows = [r.clone() for r in pool.rows]
        with torch.inference_mode():
            expect = tiny.decode_reference(ids, pos, slots, ref_rows)
            got = compiled(ids, pos, slots, pool.rows)
        assert not compiled.failed
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        for a, b in zip(pool.rows, ref_rows):  # the in-place pool write survives compilation
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert compiled._ran == {(True, True), (False, False)}


def test_compiled_bf16_step_takes_the_grouped_kernel(cpu_kernels):
    """bf16 experts: at four rows and at one the compiled step goes through openk2::float_pairs (each
    chosen expert read once; at one row its linears too; at four, W_UK and W_UV per head too, and its
    attention through openk2::latent_attention), and matches the reference step to bf16's
    rounding (measured: 3e-3 on logits of ~0.5)."""
    from openk2.model.transformer import cast
    model = cast(build_model(CFG, seed=4).eval(), torch.bfloat16)
    compiled = CompiledDecode(model)
    for lengths in ([4, 9, 2, 12], [6]):
        pool, tables, ids, pos = _pool_with_prompts(model, lengths)
        slots = pool.slots(tables, max(lengths) + 1)
        with torch.inference_mode():
            expect = model.decode_reference(ids, pos, slots, [r.clone() for r in pool.rows])
            with torch.profiler.profile() as prof:
                got = compiled(ids, pos, slots, pool.rows)
        names = {e.name for e in prof.events()}
        assert "openk2::float_pairs" in names
        assert ("openk2::latent_attention" in names) == (len(lengths) > 2)  # past small batches
        torch.testing.assert_close(got.float(), expect.float(), atol=2e-2, rtol=0)


def test_a_missing_graph_under_skipped_guards_compiles_with_all_of_them():
    """Were a regime's graph missing when its calls skip most guards, torch refuses to compile there;
    the step then runs that call with all guards, compiling it, instead of failing the request."""
    model = build_model(CFG, seed=5).eval()
    compiled = CompiledDecode(model)
    compiled._ran.add((False, False))  # as if the four-row regime had run, which it has not
    pool, tables, ids, pos = _pool_with_prompts(model, [4, 9, 2, 12])
    slots = pool.slots(tables, 13)
    with torch.inference_mode():
        expect = model.decode_reference(ids, pos, slots, [r.clone() for r in pool.rows])
        got = compiled(ids, pos, slots, pool.rows)
    assert not compiled.failed and (False, False) in compiled._ran
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_each_model_keeps_its_own_compiled_step(tiny):
    """Graphs are per model (dynamo skips re-checking each weight tensor every step, see
    engine/decode.py): same-shaped and differently built (int8) models alternate, each reading its
    own weights; a model cast to another dtype gets a new step at its next engine."""
    import copy
    from openk2.model.transformer import cast
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)
    for model in (tiny, other, quantize_model(copy.deepcopy(tiny), "int8"), tiny):
        step = _step_for(model)
        pool, tables, ids, pos = _pool_with_prompts(model, [5, 7])
        slots = pool.slots(tables, 8)
        with torch.inference_mode():
            expect = model.decode_reference(ids, pos, slots, [r.clone() for r in pool.rows])
            got = CompiledDecode(model)(ids, pos, slots, pool.rows)
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
        assert _step_for(model) is step  # kept across engines
    half = cast(copy.deepcopy(tiny), torch.bfloat16)
    before = _step_for(half)
    cast(half, torch.float32)  # in place: same model, other dtypes
    CompiledDecode(half)
    assert _step_for(half) is not before


def _step_for(model):
    from openk2.engine.decode import _StepFor
    CompiledDecode(model)
    return _StepFor.current(model)


def test_generate_compiled_equals_eager(tiny):
    prompt = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=12)
    assert torch.equal(generate(tiny, prompt, params, compile=True), generate(tiny, prompt, params))


def _compiled_equals_reference(model, batches):
    """The compiled step on prompts of each of `batches` (lists of lengths) equals the reference step."""
    compiled = CompiledDecode(model)
    for lengths in batches:
        pool, tables, ids, pos = _pool_with_prompts(model, lengths)
        slots = pool.slots(tables, max(lengths) + 1)
        with torch.inference_mode():
            expect = model.decode_reference(ids, pos, slots, [r.clone() for r in pool.rows])
            got = compiled(ids, pos, slots, pool.rows)
        assert not compiled.failed
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int8 without its kernel", "int4", "int4 without its kernel"])
def test_quantized_experts_compile(tiny, mode, monkeypatch):
    import copy

    from openk2 import kernels
    kernels.load()  # registered before the table is emptied, so that no later load fills the empty one
    if mode.endswith("without its kernel"):  # the step's own fused loop over the codes
        monkeypatch.setattr(linear, "PAIRS_KERNELS", {})
    q8 = quantize_model(copy.deepcopy(tiny), mode.split()[0])
    experts = q8.layers[1].mlp.experts
    if mode.startswith("int8"):
        assert experts.down[3].weight.data_ptr() == experts.down_q[3].data_ptr()  # views, not copies
    # with openk2's kernels for the codes, every batch is compiled (4 rows: grouped experts, the modules'
    # own linears); without, 1 and 2 rows, and 4 go through the modules
    assert CompiledDecode(q8)._compiles(4) == (not mode.endswith("without its kernel"))
    _compiled_equals_reference(q8, ([6], [3, 11], [4, 9, 2, 12]))
    assert compilable(tiny) and compilable(q8)


def test_int4_linears_compile(tiny):
    """int4 linears (decode layout, read as a stack of one) compile with int4 experts, and equal the
    reference step; a module whose weights the step cannot read (face None) is refused with a reason."""
    import copy
    q4 = quantize_model(copy.deepcopy(tiny), "int4", linears=True)
    assert compilable(q4)
    _compiled_equals_reference(q4, ([6], [3, 11]))

    class Opaque(torch.nn.Module):
        decode_weights = None
    q4.layers[0].self_attn.o_proj = Opaque()
    assert not compilable(q4)
    with pytest.raises(ValueError, match="presents no decode face"):
        CompiledDecode(q4)


def test_compiler_failure_falls_back_to_the_reference_once(tiny, monkeypatch):
    compiled = CompiledDecode(tiny)
    calls = []

    def broken(*args):
        calls.append(1)
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")
    monkeypatch.setattr(compiled, "_fn", broken)
    pool, tables, ids, pos = _pool_with_prompts(tiny, [5, 8])
    slots = pool.slots(tables, 9)
    with torch.inference_mode():
        expect = tiny.decode_reference(ids, pos, slots, [r.clone() for r in pool.rows])
        with pytest.warns(UserWarning, match="decoding eagerly.*no C\\+\\+ compiler"):
            got = compiled(ids, pos, slots, pool.rows)
        again = compiled(ids, pos, slots, pool.rows)
    assert compiled.failed and len(calls) == 1  # not retried
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(again, expect)
    fresh = CompiledDecode(tiny)
    monkeypatch.setattr(fresh, "_fn", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):  # a run-time error is not a compiler's
        fresh(ids, pos, slots, pool.rows)


def test_eager_kernel_switch_survives_overlapping_steps():
    """decode_kernels turns oneDNN off for one- and two-row bf16 eager steps; overlapping steps (two
    threads, or nested) keep it off until the last leaves, then restore it as it was."""
    import threading

    from openk2.engine.decode import decode_kernels
    bf16 = build_model(CFG, dtype=torch.bfloat16, seed=1)
    before = torch.backends.mkldnn.enabled
    with decode_kernels(bf16, 3), decode_kernels(build_model(CFG, seed=1), 1):  # 3 rows, fp32: untouched
        assert torch.backends.mkldnn.enabled == before
    entered, leave, seen = threading.Event(), threading.Event(), []

    def other_step():
        with decode_kernels(bf16, 1):
            entered.set()
            leave.wait()
            seen.append(torch.backends.mkldnn.enabled)
    thread = threading.Thread(target=other_step)
    with decode_kernels(bf16, 2):
        assert torch.backends.mkldnn.enabled is False
        thread.start()
        entered.wait()
    assert torch.backends.mkldnn.enabled is False  # the other step is still running
    leave.set()
    thread.join()
    assert seen == [False] and torch.backends.mkldnn.enabled == before
