"""Engine: continuous batching over the block cache equals per-request recompute; memory bounds,
cancellation, streaming, seeded sampling."""

import threading

import pytest
import torch

from openk2.config import PRESETS
from openk2.engine import SamplingParams, generate_recompute
from openk2.engine.engine import Engine, EngineConfig
from openk2.engine.kv_cache import BlockPool, CacheFull
from openk2.model import build_model


@pytest.fixture(scope="module")
def tiny():
    return build_model(PRESETS["k2-tiny"], seed=2).eval()


def _prompt(n, seed):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_mixed_batch_joining_at_different_steps_equals_recompute(tiny, compile):
    engine = Engine(tiny, EngineConfig(cache_tokens=512, block_size=8, prefill_chunk=5, idle_prefill_chunk=5,
                                       compile=compile))
    engine.warmup()  # compiles each batch regime's graph (a no-op when eager); leaves the pool empty
    assert len(engine.pool.free) == engine.pool.num_blocks and not engine.has_work()
    specs = [(3, 9), (17, 6), (8, 12), (1, 5), (26, 4)]  # (prompt length, max_tokens)
    reqs, joins = [], {0: [0, 1], 2: [2], 5: [3], 9: [4]}  # step -> requests that arrive then
    step = 0
    with torch.compiler.set_stance("fail_on_recompile"):  # warmup compiled every graph needed
        while step in joins or engine.has_work() or step < max(joins):
            for i in joins.get(step, []):
                params = SamplingParams(max_tokens=specs[i][1])
                reqs.append((i, engine.add_request(_prompt(specs[i][0], i), params)))
            engine.step()
            step += 1
    for i, req in reqs:
        n, m = specs[i]
        expect = generate_recompute(tiny, torch.tensor([_prompt(n, i)]), SamplingParams(max_tokens=m))[0]
        assert req.output == expect.tolist(), i
        assert req.finish_reason == "length" and not req.blocks
    assert engine.pool.available == engine.pool.num_blocks  # every block back (free, or idle in the prefix cache)
    assert not compile or not engine.compiled.failed


def test_background_warmup_answers_eagerly_then_hands_over_without_recompiling(tiny):
    """`openk2 serve` answers while its decode step compiles: the engine decodes eagerly until the
    compile thread has every regime's graph, then switches to it — with no compile left for later."""
    engine = Engine(tiny, EngineConfig(cache_tokens=512, block_size=8, prefill_chunk=5, idle_prefill_chunk=5,
                                       compile=True))
    heard, eager_done = [], threading.Event()

    def progress(message):  # hold the compile thread until the early requests are answered
        heard.append(message)
        eager_done.wait(timeout=60)
    thread = engine.warmup(background=True, progress=progress)
    specs = [(3, 9, 0), (17, 6, 1), (8, 12, 2)]  # (prompt length, max_tokens, seed)
    early = [engine.add_request(_prompt(n, s), SamplingParams(max_tokens=m)) for n, m, s in specs]
    engine.run()
    assert engine.decode_mode == "compiling" and engine.compiled is None  # answered while compiling
    eager_done.set()
    thread.join()
    assert engine.decode_mode == "compiled" and len(heard) == 4 and "compiled for 1 row" in heard[0]
    assert "compiled steps from now on" in heard[-1]
    late = [engine.add_request(_prompt(n, s), SamplingParams(max_tokens=m)) for n, m, s in specs]
    with torch.compiler.set_stance("fail_on_recompile"):  # the thread compiled every graph needed
        engine.run()
    assert not engine.compiled.failed
    for reqs in (early, late):
        for (n, m, s), req in zip(specs, reqs):
            expect = generate_recompute(tiny, torch.tensor([_prompt(n, s)]), SamplingParams(max_tokens=m))[0]
            assert req.output == expect.tolist(), s


def test_batched_prefill_of_prompts_at_different_offsets_equals_recompute(tiny):
    """Prompts prefill several to a forward, right-padded, at per-row offsets (the first one is in
    its second chunk when the short ones join it)."""
    engine = Engine(tiny, EngineConfig(cache_tokens=512, block_size=4, prefill_chunk=12, idle_prefill_chunk=12))
    lengths = [14, 5, 3, 9, 4, 7]
    reqs = [engine.add_request(_prompt(n, 10 + i), SamplingParams(max_tokens=6)) for i, n in enumerate(lengths)]
    engine.step(), engine.step()  # 12 tokens of the first, then its last 2 beside 2 tokens of the next
    # (a third row would make the batch's cache 3 × 14 rows, over twice the first's own 14)
    assert [r.prefilled for r in reqs] == [14, 2, 0, 0, 0, 0]
    engine.run()
    for i, (n, req) in enumerate(zip(lengths, reqs)):
        expect = generate_recompute(tiny, torch.tensor([_prompt(n, 10 + i)]), SamplingParams(max_tokens=6))[0]
        assert req.output == expect.tolist(), i


def test_stop_token_and_seeded_sampling(tiny):
    engine = Engine(tiny, EngineConfig(cache_tokens=256))
    free = engine.add_request(_prompt(4, 1), SamplingParams(max_tokens=10))
    engine.run()
    stop = free.output[3]
    stopped = engine.add_request(_prompt(4, 1), SamplingParams(max_tokens=10, stop_token_ids=(stop,)))
    engine.run()
    assert stopped.output == free.output[:free.output.index(stop) + 1] and stopped.finish_reason == "stop"
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a, b = engine.add_request(_prompt(5, 2), params), engine.add_request(_prompt(5, 2), params)
    engine.run()
    assert a.output == b.output  # identical requests, same seed, batched together


def test_memory_bound_queueing_and_clear_errors(tiny):
    engine = Engine(tiny, EngineConfig(cache_tokens=64, block_size=16))  # 4 blocks
    with pytest.raises(ValueError, match="needs 80 tokens of cache, the engine holds 64"):
        engine.add_request(_prompt(40, 0), SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="exceeds the context"):
        Engine(tiny, EngineConfig(cache_tokens=4096)).add_request(_prompt(500, 0), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="prompt ids"):
        engine.add_request([0, 9999], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="must be >= 1"):
        EngineConfig(max_batch=0)
    first = engine.add_request(_prompt(20, 1), SamplingParams(max_tokens=20))  # 3 blocks
    second = engine.add_request(_prompt(10, 2), SamplingParams(max_tokens=10))  # 2 blocks: must wait
    engine.step()
    assert first in engine.running and second in engine.waiting
    engine.run()
    assert first.finished and second.finished and len(second.output) == 10


def test_cancel_frees_blocks_and_others_continue(tiny):
    engine = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8))
    a = engine.add_request(_prompt(6, 3), SamplingParams(max_tokens=30))
    b = engine.add_request(_prompt(6, 4), SamplingParams(max_tokens=5))
    engine.step(), engine.step()
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and not a.blocks and a not in engine.running
    engine.run()
    expect = generate_recompute(tiny, torch.tensor([_prompt(6, 4)]), SamplingParams(max_tokens=5))[0]
    assert b.output == expect.tolist()


def test_stream_yields_tokens_as_produced(tiny):
    engine = Engine(tiny, EngineConfig(cache_tokens=256))
    req = engine.add_request(_prompt(7, 5), SamplingParams(max_tokens=6))
    seen = []
    for tok in engine.stream(req):
        seen.append(tok)
        assert len(req.output) == len(seen)  # one token per step, handed over at once
    assert seen == req.output and len(seen) == 6


def test_block_pool_gather_scatter_round_trip():
    pool = BlockPool(PRESETS["k2-tiny"], num_blocks=6, block_size=4)
    a, b = [], []
    pool.grow(a, 7), pool.grow(b, 3)
    assert len(a) == 2 and len(b) == 1 and len(pool.free) == 3
    cache = pool.gather([a, b], 7)
    for c in cache:
        c.ckv.normal_()
    pool.scatter(cache, [a, b], [0, 0], [3, 3])
    again = pool.gather([a, b], 3)
    assert all(torch.equal(x.ckv, y.ckv[:, :3]) for x, y in zip(again, cache))
    with pytest.raises(CacheFull):
        pool.grow(b, 20)
    pool.release(a)
    assert len(pool.free) == 5 and not a


def test_block_pool_views_runs_of_consecutive_blocks_in_place():
    pool = BlockPool(PRESETS["k2-tiny"], num_blocks=12, block_size=4)
    for r in pool.rows:
        r.normal_()
    tables, firsts = [[], [], []], []
    for t in tables:  # a fresh pool hands out consecutive blocks: runs 3 blocks apart
        slots, first = pool.reserve(t, 10)
        firsts.append(first)
        assert torch.equal(slots, pool.slots([t], 10)[0])
    assert firsts == [0, 12, 24]
    view = pool.view(firsts, 9)
    assert all(torch.equal(v.ckv, g.ckv) for v, g in zip(view, pool.gather(tables, 9)))
    view[0].ckv[1, 8] = 7.0  # a step's write lands in the pool
    assert (pool.rows[0][12 + 8] == 7.0).all()
    assert pool.view(firsts, 13) is None  # row 0's run would reach into row 1's
    assert pool.view([firsts[0], firsts[2]], 9) is not None and pool.view([firsts[2], firsts[0]], 9) is None
    pool.release(tables[1])
    other = []
    assert pool.reserve(other, 20)[1] is None and pool.view([None], 4) is None  # blocks 3, 4, 5, 9, 10


# --- prefix cache ----------------------------------------------------------------------------------
def test_a_prompt_that_extends_a_finished_one_reuses_its_rows_and_equals_recompute(tiny):
    """An agent's next turn re-sends the conversation: prompt, reply, more. The engine computes only what
    follows the cached full blocks (prompt rows from prefill, reply rows from decode steps), and the
    greedy reply equals recompute and an engine without the cache."""
    engine = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=64))
    first = engine.add_request(_prompt(21, 0), SamplingParams(max_tokens=12))
    engine.run()
    assert first.cached_tokens == 0
    follow = first.prompt + first.output + _prompt(9, 1)  # 42 ids: rows 0..31 cached (4 full blocks)
    second = engine.add_request(follow, SamplingParams(max_tokens=6))
    engine.run()
    assert second.cached_tokens == 32
    plain = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=64, prefix_cache=False))
    again = plain.add_request(follow, SamplingParams(max_tokens=6))
    plain.run()
    expect = generate_recompute(tiny, torch.tensor([follow]), SamplingParams(max_tokens=6))[0].tolist()
    assert second.output == again.output == expect and again.cached_tokens == 0
    assert plain.pool.available == len(plain.pool.free) == plain.pool.num_blocks and not plain.pool.index


def test_requests_share_cached_blocks_and_the_pool_evicts_idle_ones(tiny):
    engine = Engine(tiny, EngineConfig(cache_tokens=64, block_size=8, prefill_chunk=64))  # 8 blocks
    shared = _prompt(16, 3)
    a = engine.add_request(shared + [1, 2, 3], SamplingParams(max_tokens=4))
    engine.step()  # a's prompt is prefilled and registered; a keeps decoding
    b = engine.add_request(shared + [4], SamplingParams(max_tokens=4))
    engine.step()
    assert b.cached_tokens == 16 and b.blocks[:2] == a.blocks[:2]
    assert [engine.pool.refs[x] for x in a.blocks[:2]] == [2, 2]  # held by both, written by neither
    engine.run()
    expect = generate_recompute(tiny, torch.tensor([shared + [4]]), SamplingParams(max_tokens=4))[0].tolist()
    assert b.output == expect and engine.pool.available == 8 and engine.pool.idle
    # a prompt that needs every block: idle cached blocks are evicted for it, the least recently used first
    c = engine.add_request(_prompt(60, 4), SamplingParams(max_tokens=4))
    engine.run()
    assert c.finish_reason == "length" and c.cached_tokens == 0 and engine.pool.match(shared) == []
    # prompt log-probs need every position's logits: never served from the cache
    d = engine.add_request(c.prompt, SamplingParams(max_tokens=1, logprobs=0, prompt_logprobs=True))
    engine.run()
    assert d.cached_tokens == 0 and len(d.prompt_logprobs) == 60


def test_chunked_prefill_runs_the_fused_attention_kernel(tiny):
    """Chunks after a first attend through a mask; CPU's fused (flash) kernel takes 2-D and 4-D masks
    only (a 3-D one sent every later chunk to the math path: the Engine prefilled 4,000 tokens at half
    the bare forward's speed). Forced to the fused kernel, the math path is no fallback: it raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    engine = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=8, idle_prefill_chunk=8))
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=2))  # one row: a 2-D mask
    ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = tiny.new_cache(2, 32)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.inference_mode():
        engine.run()
        tiny(ids, torch.tensor([0, 0]), cache)  # rows at their own positions: a 4-D mask [B, 1, S, T]
        tiny(ids, torch.tensor([6, 3]), cache)


def test_prefill_chunk_is_bounded_only_while_others_decode(tiny):
    """A prompt prefills in one forward of up to `idle_prefill_chunk` tokens while no request decodes
    (nothing to stall), and `prefill_chunk` at a time while one does; the tokens are the reference's."""
    engine = Engine(tiny, EngineConfig(cache_tokens=256, block_size=8, prefill_chunk=4, idle_prefill_chunk=16))
    first = engine.add_request(_prompt(14, 1), SamplingParams(max_tokens=8))
    engine.step()
    assert first.prefilled == 14 and len(first.output) == 1  # alone: the whole prompt, then its first token
    second = engine.add_request(_prompt(14, 2), SamplingParams(max_tokens=3))
    engine.step()
    assert second.prefilled == 4 and len(first.output) == 2  # beside a decoding row: one bounded chunk
    engine.run()
    for req in (first, second):
        assert req.output == generate_recompute(tiny, torch.tensor([req.prompt]), req.params)[0].tolist()
