"""SFT: the loss mask token by token, packing that leaks no attention (a packed row's logits equal
each conversation run alone), the packed loader's order and resume, malformed data, and a tiny run
that lowers the masked loss, resumes exactly and leaves a loadable checkpoint."""

import copy
import json
import re

import pytest
import torch
from test_chat import K2_LIKE_TEMPLATE

from openk2.config import PRESETS
from openk2.data.packing import IGNORE, PackedSFTLoader, fit_examples, pack_rows, sft_val_batches
from openk2.model import build_model, lm_loss
from openk2.model.rows import bucket_rows
from openk2.tokenizer import Tokenizer
from openk2.tokenizer.sft import encode_with_mask, read_jsonl

TOK = Tokenizer.byte_level()  # byte-level: ids 0..255, K2's specials from 256
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
          {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
          {"role": "tool", "tool_call_id": CALL["id"], "name": "get_weather", "content": "Sunny"},
          {"role": "assistant", "content": "Sunny <|im_end|> today."}]  # a special string in content: text


def expected_dialog():
    """The rendered pieces of DIALOG, written out by hand, each with the mask it must get."""
    declare = json.dumps(TOOLS, separators=(",", ":"))
    return [("<|im_system|>tool_declare<|im_middle|>" + declare + "<|im_end|>", 0),
            ("<|im_system|>system<|im_middle|>Be brief.<|im_end|>", 0),
            ("<|im_user|>user<|im_middle|>Weather?<|im_end|>", 0),
            ("<|im_assistant|>assistant<|im_middle|>", 0),
            ("Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>', 1),
            ("<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\nSunny<|im_end|>", 0),
            ("<|im_assistant|>assistant<|im_middle|>", 0),
            ("Sunny ", 1), ("<|im_end|>", "text"), (" today.<|im_end|>", 1)]


@pytest.mark.parametrize("template", [None, K2_LIKE_TEMPLATE], ids=["built_in", "checkpoint_jinja"])
def test_mask_is_exactly_the_assistant_tokens(template):
    ids, mask = encode_with_mask(TOK, copy.deepcopy(DIALOG), TOOLS, template)
    want_ids, want_mask = [], []
    for text, m in expected_dialog():
        piece = TOK.encode(text) if m == "text" else TOK.encode(text, allow_special=True)
        want_ids += piece
        want_mask += [1 if m else 0] * len(piece)
    assert ids == want_ids
    for i, (got, want) in enumerate(zip(mask, want_mask)):  # token by token, so a failure names the token
        assert got == want, f"token {i} ({TOK.decode([ids[i]])!r}): mask {got}, expected {want}"
    assert len(mask) == len(want_mask)
    assert ids[-1] == TOK.token_id("<|im_end|>") and mask[-1] == 1


def test_plain_chat_without_tools_and_call_ids_assigned():
    ids, mask = encode_with_mask(TOK, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                       {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}])
    taught = [TOK.decode([i]) for i, m in zip(ids, mask) if m]
    assert "".join(taught) == "yo<|im_end|>ok<|im_end|>"
    calls = [{"role": "user", "content": "w"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    ids, mask = encode_with_mask(TOK, calls)
    assert "functions.f:0" in TOK.decode([i for i, m in zip(ids, mask) if m])


def test_weight_zero_keeps_a_turn_in_context_but_out_of_the_loss():
    """OpenAI's fine-tuning `weight`: the call turn at 0 is rendered exactly as before (the answer is
    trained after it), and only the answer's tokens keep mask 1."""
    dialog = copy.deepcopy(DIALOG)
    ids, mask = encode_with_mask(TOK, dialog, TOOLS)
    dialog[2]["weight"] = 0
    ids0, mask0 = encode_with_mask(TOK, dialog, TOOLS)
    assert ids0 == ids
    call_turn = TOK.encode(expected_dialog()[4][0], allow_special=True)
    start = next(i for i in range(len(ids)) if ids[i:i + len(call_turn)] == call_turn)
    span = range(start, start + len(call_turn))
    assert all(mask[i] for i in span) and not any(mask0[i] for i in span)
    assert [m for i, m in enumerate(mask0) if i not in span] == [m for i, m in enumerate(mask) if i not in span]
    dialog[2]["weight"] = 0.0  # JSON's 0.0 is 0
    assert encode_with_mask(TOK, dialog, TOOLS) == (ids0, mask0)
    dialog[2]["weight"] = 1
    assert encode_with_mask(TOK, dialog, TOOLS) == (ids, mask)
    dialog[2]["weight"] = 0.5  # called directly, without the reader's check
    with pytest.raises(ValueError, match="message 2 has weight 0.5"):
        encode_with_mask(TOK, dialog, TOOLS)


def test_templates_that_rewrite_earlier_turns_are_refused():
    """K2-Thinking drops the reasoning of finished turns: the call turn renders differently once the
    answer follows, so no one sequence trains both turns as generated."""
    dialog = copy.deepcopy(DIALOG)
    dialog[2]["reasoning_content"] = "let me look"
    with pytest.raises(ValueError, match="differently once later turns follow"):
        encode_with_mask(TOK, dialog, TOOLS, builtin_thinking=True)


@pytest.mark.parametrize("line, error", [
    ("{not json", ":2: not JSON"),
    ('{"messages": []}', ':2: expected an object with a non-empty "messages" list'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', ":2: message 0 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', ":2: no assistant message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "a"}]}]}',
     ":2: message 1 has a tool call without function name"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": {}}',
     ':2: "tools" must be a list'),
    ('{"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}',
     ":2: message 0 (user) has a weight; only assistant messages take one"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]}',
     ":2: message 1 has weight 0.5; expected 0 (not trained on) or 1"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": true}]}',
     ":2: message 1 has weight True"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": "0"}]}',
     ":2: message 1 has weight '0'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}',
     ":2: no assistant message of weight 1")])
def test_malformed_lines_name_their_line(tmp_path, line, error):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": DIALOG[1:3], "tools": TOOLS}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=re.escape(error)):
        read_jsonl(path)


def test_read_jsonl_with_and_without_tools(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": DIALOG, "tools": TOOLS}) + "\n\n" + json.dumps({"messages": DIALOG[:3]}))
    rows = read_jsonl(path)
    assert [(n, t) for n, _, t in rows] == [(1, TOOLS), (3, None)] and rows[0][1] == DIALOG


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        out.append((ids, [0] * (n // 2) + [1] * (n - n // 2)))
    return out


@pytest.mark.parametrize("absorb", [False, True], ids=["materialised", "absorbed"])
def test_packed_row_equals_each_conversation_alone(absorb):
    """Block-diagonal attention and per-conversation positions: every position of a packed row (three
    conversations and padding) has the logits of its conversation run alone, in fp32."""
    model = build_model(PRESETS["k2-tiny"], seed=0).eval()
    examples = _examples([9, 14, 6])
    x, y, seg = sft_val_batches(examples, 1, 32, 1)[0]
    assert seg.tolist()[0] == [1] * 8 + [2] * 13 + [3] * 5 + [0] * 6
    with torch.no_grad():
        packed = model(x, segment_ids=seg, absorb=absorb)[0]
        at = 0
        for ids, mask in examples:
            alone = model(torch.tensor([ids[:-1]]))[0]
            torch.testing.assert_close(packed[at:at + len(ids) - 1], alone, rtol=0, atol=2e-5)
            want_y = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
            assert y[0, at:at + len(ids) - 1].tolist() == want_y
            at += len(ids) - 1
        assert (y[0, at:] == IGNORE).all()
        unpacked = model(x)[0]  # without segments the later conversations see the earlier ones
        assert (unpacked[8:21] - packed[8:21]).abs().max() > 1e-3


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-autocast"])
def test_packed_bf16_runs_padded_on_cpu_equal_each_conversation_alone(autocast):
    """In bf16 on CPU each conversation's attention runs on a run padded to `bucket_rows` at its end
    (13 positions → 14 here): logits and QK-Clip's max logits are still each conversation's alone.
    Under autocast q, k and v come in different dtypes; all three must be padded alike."""
    model = build_model(PRESETS["k2-tiny"], seed=0).eval()
    if not autocast:
        model = model.to(torch.bfloat16)
    model.record_max_logits(True)
    examples = _examples([9, 14, 6])
    x, _, seg = sft_val_batches(examples, 1, 32, 1)[0]
    assert bucket_rows(13) == 14
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        packed, packed_max = model(x, segment_ids=seg)[0], model.max_logits()
        at, tops = 0, []
        for ids, _ in examples:
            alone = model(torch.tensor([ids[:-1]]))[0]
            tops.append(model.max_logits())
            torch.testing.assert_close(packed[at:at + len(ids) - 1], alone, rtol=0.02, atol=0.02)
            at += len(ids) - 1
        model(x[:, at:])
        tops.append(model.max_logits())  # the padding, a run of its own
    torch.testing.assert_close(packed_max, torch.stack(tops).amax(0), rtol=0, atol=1e-2)


def test_packed_backward_under_bf16_autocast_is_the_sum_of_each_conversations():
    """The training step's case (fp32 weights, bf16 autocast, runs padded): a packed row's gradient is
    the sum of its conversations' gradients run alone."""
    model = build_model(PRESETS["k2-tiny"], seed=0)
    examples = _examples([9, 14, 6])
    x, _, seg = sft_val_batches(examples, 1, 32, 1)[0]
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(ids, segment_ids=None, n=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids, segment_ids=segment_ids)[0, :n]
        return torch.autograd.grad(logits.float().square().mean() * len(logits), params, allow_unused=True)

    packed = grads(x, seg, 26)
    alone = [grads(torch.tensor([ids[:-1]])) for ids, _ in examples]
    for i, p in enumerate(packed):
        parts = [g[i] for g in alone if g[i] is not None]
        if p is None:
            assert not parts
            continue
        total = torch.stack(parts).sum(0)
        assert (p - total).norm() <= 0.03 * total.norm() + 1e-6, i


def test_loader_resumes_exactly_and_splits_ranks():
    examples = _examples([5, 9, 3, 12, 7, 4, 10, 6, 8, 2, 11, 5], seed=1)
    full = PackedSFTLoader(examples, 2, 16, seed=3)
    batches = [full.next_batch() for _ in range(8)]  # several epochs
    assert full.epoch >= 1
    resumed = PackedSFTLoader(examples, 2, 16, seed=3)
    for _ in range(3):
        resumed.next_batch()
    state = resumed.state_dict()
    again = PackedSFTLoader(examples, 2, 16, seed=3)
    again.load_state_dict(state)
    for want in batches[3:]:
        assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), want))
    ranks = [PackedSFTLoader(examples, 1, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    for want in batches[:4]:
        got = [r.next_batch() for r in ranks]
        assert all(torch.equal(torch.cat([g[k] for g in got]), want[k]) for k in range(3))
    with pytest.raises(ValueError, match="not the same data"):
        PackedSFTLoader(examples[:-1], 2, 16).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "packing"}  # a state from before first-fit packing
    with pytest.raises(ValueError, match="packed another way"):
        PackedSFTLoader(examples, 2, 16, seed=3).load_state_dict(old)
    PackedSFTLoader(examples, 2, 16, seed=3).load_state_dict({**old, "position": 0})  # an epoch's start is fine
    # every conversation once per epoch, each row within seq_len
    rows = full.epoch_rows(0)
    assert sorted(i for r in rows for i in r) == list(range(len(examples)))
    assert all(sum(len(examples[i][0]) - 1 for i in r) <= 16 for r in rows)


def test_fit_examples_counts_truncated_and_dropped():
    examples = _examples([40, 10, 3]) + [([1, 2, 3, 4], [0, 0, 0, 0])]
    kept, counts = fit_examples(examples, 16)  # the 40 cut to 17 keeps no loss token: dropped too
    assert counts == {"truncated": 1, "dropped_long": 0, "dropped_no_loss": 2}
    assert [len(ids) for ids, _ in kept] == [10, 3]
    examples[0] = (examples[0][0], [0, 1] * 20)
    kept, counts = fit_examples(examples, 16)
    assert counts == {"truncated": 1, "dropped_long": 0, "dropped_no_loss": 1}
    assert [len(ids) for ids, _ in kept] == [17, 10, 3] and kept[0][1] == [0, 1] * 8 + [0]
    kept, counts = fit_examples(examples, 16, long="drop")
    assert counts == {"truncated": 0, "dropped_long": 1, "dropped_no_loss": 1} and len(kept) == 2
    assert pack_rows([5, 5, 7, 2], [0, 1, 2, 3], 10) == [[0, 1], [2, 3]]
    assert pack_rows([6, 7, 3, 1], [0, 1, 2, 3], 10) == [[0, 2, 3], [1]]  # first fit: 3 and 1 go back to row 0


# ---------------------------------------------------------------- training

def _conversations():
    """A handful of short chats and tool calls; the assistant turns follow fixed patterns to learn."""
    out = []
    for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Doha", "Bern", "Riga"]):
        call = {"id": f"functions.get_weather:{0}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        if i % 2:
            out.append({"messages": [{"role": "user", "content": f"Say hi to {city}."},
                                     {"role": "assistant", "content": f"Hi, {city}!"}]})
        else:
            out.append({"tools": TOOLS, "messages": [
                {"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "sun"},
                {"role": "assistant", "content": f"Sun in {city}."}]})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random k2-tiny (512 rows: byte-level text + K2's specials) that ships a jinja chat template,
    and the conversations as JSONL."""
    from openk2.checkpoint import save_hf
    root = tmp_path_factory.mktemp("sft")
    folder = save_hf(build_model(PRESETS["k2-tiny"], seed=0), root / "base", progress=False)
    (folder / "chat_template.jinja").write_text(K2_LIKE_TEMPLATE)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in _conversations()))
    return folder, data


def _sft_cfg(base, out, **kw):
    from openk2.train.sft import SFTConfig
    folder, data = base
    return SFTConfig(**{"checkpoint": str(folder), "model": str(folder), "data": str(data), "out_dir": str(out),
                        "seq_len": 512, "batch_size": 2, "steps": 12, "lr": 1e-2, "warmup_steps": 1,
                        "decay_frac": 0.25, "val_fraction": 0.25, "eval_every": 6, "eval_batches": 1,
                        "log_every": 1, "ckpt_every": 6, "autocast": "none", **kw})


def _masked_loss(model, batches) -> float:
    from openk2.model.transformer import lm_loss
    with torch.no_grad():
        return sum(lm_loss(model(x, segment_ids=s), y).item() for x, y, s in batches) / len(batches)


def test_chat_special_tokens_get_gradients(base):
    """Pretraining never saw `<|im_end|>` or the tool-call markers; SFT must train their rows."""
    from openk2.checkpoint import load_hf
    from openk2.model.transformer import lm_loss
    from openk2.tokenizer.sft import encode_with_mask
    model = load_hf(base[0], dtype=torch.float32, progress=False)
    examples = [encode_with_mask(TOK, c["messages"], c.get("tools")) for c in _conversations()[:2]]
    x, y, seg = sft_val_batches(examples, 1, 400, 1)[0]
    lm_loss(model(x, segment_ids=seg), y).backward()
    names = ["<|im_end|>", "<|im_assistant|>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
             "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>"]
    for name in names:
        i = TOK.token_id(name)
        assert i < model.cfg.vocab_size and (x == i).any()
        assert model.model.embed_tokens.weight.grad[i].abs().sum() > 0, name
        assert model.lm_head.weight.grad[i].abs().sum() > 0, name


def test_sft_lowers_masked_loss_resumes_exactly_and_saves_a_checkpoint(base, tmp_path):
    from openk2.checkpoint import latest_checkpoint, load_hf
    from openk2.cli import main
    from openk2.tokenizer.sft import encode_with_mask
    from openk2.train.sft import sft
    full = sft(_sft_cfg(base, tmp_path / "full"))
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    start, steps = rows[0], [r for r in rows if "step" in r]
    assert start["sft"]["conversations"] == 8 and start["sft"]["val"] == 2 and start["sft"]["train"] == 6
    assert all(0 < r["loss_token_share"] < 0.5 for r in steps)  # prompts, headers and padding carry no loss
    ckpt = latest_checkpoint(tmp_path / "full")
    assert ckpt.name == "step_000012" and (ckpt / "chat_template.jinja").read_text() == K2_LIKE_TEMPLATE
    before, after = load_hf(base[0], progress=False), load_hf(ckpt, progress=False)
    examples = [encode_with_mask(TOK, c["messages"], c.get("tools"), K2_LIKE_TEMPLATE) for c in _conversations()]
    batches = sft_val_batches(examples, 2, 512, 4)
    assert _masked_loss(after, batches) < 0.5 * _masked_loss(before, batches)
    end = TOK.token_id("<|tool_call_end|>")  # a chat token's rows moved
    assert not torch.equal(before.lm_head.weight[end], after.lm_head.weight[end])

    sft(_sft_cfg(base, tmp_path / "split"), stop_at=7)  # interrupted one step after the step-6 checkpoint
    folder, data = base
    main(["sft", str(folder), "--data", str(data), "--out-dir", str(tmp_path / "split"), "--seq-len", "512",
          "--batch-size", "2", "--steps", "12", "--lr", "1e-2", "--warmup-steps", "1", "--decay-frac", "0.25",
          "--val-fraction", "0.25", "--eval-every", "6", "--eval-batches", "1", "--log-every", "1",
          "--ckpt-every", "6", "--autocast", "none", "--resume"])
    split = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0  # the CLI plots the run
    assert [r["loss"] for r in split if "step" in r] == [r["loss"] for r in steps]  # bit for bit
    a, b = after.state_dict(), load_hf(latest_checkpoint(tmp_path / "split"), progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["val_loss"] == [r for r in split if "val_loss" in r][-1]["val_loss"]


def test_sft_errors(base, tmp_path):
    from openk2.train.sft import parse_sft_args, sft
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_conversations()[0]) + "\n" + json.dumps(
        {"messages": [{"role": "assistant", "content": "first"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: the conversation opens with an assistant message"):
        sft(_sft_cfg(base, tmp_path / "o", data=str(bad)))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(_conversations()[1]) + "\n")
    with pytest.raises(ValueError, match="1 conversation"):
        sft(_sft_cfg(base, tmp_path / "o", data=str(one)))
    with pytest.raises(ValueError, match="no conversation left for training"):
        sft(_sft_cfg(base, tmp_path / "o", seq_len=8, long="drop"))
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        sft(_sft_cfg(base, tmp_path / "o", checkpoint=str(tmp_path)))
    with pytest.raises(SystemExit):
        parse_sft_args([str(base[0])])  # no --data


def test_sft_extends_the_context(base, tmp_path):
    """--context N: YaRN's factor becomes N / the original window, the run trains at seq_len N and the
    saved checkpoint says so (an engine then admits N-token prompts); longer rows without it are refused."""
    from openk2.checkpoint import latest_checkpoint, load_hf
    from openk2.config import ModelConfig
    from openk2.model.rope import rope_inv_freq
    from openk2.train.sft import sft, with_context
    cfg = ModelConfig.from_json(base[0])
    assert (cfg.max_position_embeddings, cfg.rope_scaling["factor"]) == (512, 4.0)
    with pytest.raises(ValueError, match="give --context 1024"):
        sft(_sft_cfg(base, tmp_path / "o", seq_len=1024))
    with pytest.raises(ValueError, match="shorter than the original window"):
        with_context(cfg, 64)
    sft(_sft_cfg(base, tmp_path / "long", seq_len=1024, context=1024, steps=4, ckpt_every=4, eval_every=4))
    saved = ModelConfig.from_json(latest_checkpoint(tmp_path / "long"))
    assert (saved.max_position_embeddings, saved.rope_scaling["factor"]) == (1024, 8.0)
    model = load_hf(latest_checkpoint(tmp_path / "long"), progress=False)
    assert torch.equal(model.inv_freq, rope_inv_freq(saved)[0])
    assert not torch.equal(model.inv_freq, rope_inv_freq(cfg)[0])  # the low frequencies were stretched


def test_padding_is_not_counted_in_expert_loads():
    """Balancing reads the loads: padding (segment 0, all one id) would pile onto a few experts."""
    model = build_model(PRESETS["k2-tiny"], seed=0)
    x, _, seg = sft_val_batches([(list(range(10, 30)), [0] * 10 + [1] * 10)], 1, 128, 1)[0]
    model(x, segment_ids=seg)
    k = model.cfg.num_experts_per_tok
    assert all(int(load.sum()) == k * int((seg > 0).sum()) for load in model.expert_load().values())
    model(x)  # unpacked: every position counts, as before
    assert all(int(load.sum()) == k * x.numel() for load in model.expert_load().values())


def test_gradient_accumulation_weighs_micro_batches_by_their_loss_tokens(base, tmp_path):
    """Rows of 151 and 3 assistant tokens: one batch of two rows, or two micro-batches of one, give the
    same step (the mean over the step's loss tokens), so a resume may re-split a batch."""
    folder, _ = base
    data = tmp_path / "skewed.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Q" * 150 if i % 2 else "q"},
                          {"role": "assistant", "content": "ok" if i % 2 else "A" * 150}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from openk2.train.sft import sft
    runs = [sft(_sft_cfg(base, tmp_path / f"bs{bs}", data=str(data), seq_len=256, batch_size=bs, grad_accum=ga,
                         steps=1, warmup_steps=0, decay_frac=0.0, val_fraction=0.2, eval_every=1, ckpt_every=1,
                         seed=1)) for bs, ga in ((2, 1), (1, 2))]
    assert runs[0]["loss"] == pytest.approx(runs[1]["loss"], rel=1e-6)
    assert runs[0]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("absorb", [False, True], ids=["materialised", "absorbed"])
def test_packed_max_logits_are_each_conversations(absorb):
    """QK-Clip's per-head max logit of a packed row is the largest over its conversations run alone
    (padding included, as a run of its own): no cross-conversation score counts."""
    model = build_model(PRESETS["k2-tiny"], seed=0).eval()
    model.record_max_logits(True)
    examples = _examples([9, 14, 6])
    x, _, seg = sft_val_batches(examples, 1, 32, 1)[0]
    with torch.no_grad():
        model(x, segment_ids=seg, absorb=absorb)
        packed = model.max_logits()
        alone = [(model(x[:, a:b]), model.max_logits())[1] for a, b in ((0, 8), (8, 21), (21, 26), (26, 32))]
    torch.testing.assert_close(packed, torch.stack(alone).amax(0), rtol=0, atol=1e-5)


def test_kept_logits_under_bf16_autocast_are_the_full_forwards():
    """On CPU under bf16 autocast the kept rows are padded for the vocabulary matmul (`pad_rows`); the
    logits returned are exactly the kept positions', no more."""
    model = build_model(PRESETS["k2-tiny"], seed=0)
    x, y, seg = sft_val_batches(_examples([9, 14, 6]), 1, 32, 1)[0]
    keep = y != IGNORE
    assert bucket_rows(int(keep.sum())) > int(keep.sum())  # the padding is exercised
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full, kept = model(x, segment_ids=seg), model(x, segment_ids=seg, keep=keep)
    assert kept.shape == (int(keep.sum()), full.shape[-1])
    torch.testing.assert_close(kept.float(), full[keep].float(), atol=2e-2, rtol=2e-2)


def test_loss_on_kept_positions_equals_the_full_loss():
    """`keep=`: logits only where a target is; the loss and every gradient are the full forward's."""
    model = build_model(PRESETS["k2-tiny"], seed=0)
    x, y, seg = sft_val_batches(_examples([9, 14, 6]), 1, 32, 1)[0]
    grads = []
    for keep in (None, y != IGNORE):
        model.zero_grad()
        loss = lm_loss(model(x, segment_ids=seg, keep=keep), y if keep is None else y[keep])
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, full_g), (kept, kept_g) = grads
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(full_g, kept_g):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


REFUSED = [{"role": "user", "content": "Order SKU-1 twice."},
           {"role": "assistant", "weight": 0, "content": "Calling place_order with sku SKU-1.",
            "tool_calls": [{"type": "function", "function": {"name": "place_order", "arguments": '{"sku": "SKU-1"}'}}]},
           {"role": "tool", "tool_call_id": "functions.place_order:0", "name": "place_order",
            "content": "Error: there is no tool named 'place_order'; the tools are: plan_trip, get_weather."},
           {"role": "assistant", "weight": 0, "content": "No place_order here. Calling place_order with sku SKU-1.",
            "tool_calls": [{"type": "function", "function": {"name": "place_order", "arguments": '{"sku": "SKU-1"}'}}]},
           {"role": "tool", "tool_call_id": "functions.place_order:1", "name": "place_order", "content": "Error: …"},
           {"role": "assistant", "content": "I cannot order here."}]
PLAN_TRIP = {"type": "function", "function": {"name": "plan_trip", "parameters": {"type": "object"}}}


def test_refused_calls_mark_the_token_that_leaves_the_declared_names():
    """`avoid_refused`: in each weight-0 turn that calls an undeclared tool, the token where the name
    first differs from every declared one ("plan_trip" is declared: "pla" is shared, the "c" of
    "place_order" is the first that is not), once, at the name's last mention in the text (the call's
    id, a copy of it, is not marked); "No place_order here." (an earlier mention) is not marked;
    nothing else changes."""
    from openk2.tokenizer.sft import AVOID_MARK
    tools = TOOLS + [PLAN_TRIP]
    ids, mask = encode_with_mask(TOK, copy.deepcopy(REFUSED), tools)
    ids2, mask2 = encode_with_mask(TOK, copy.deepcopy(REFUSED), tools, None, True)
    assert ids2 == ids and all(m in (0, 1) for m in mask)
    marked = [i for i, m in enumerate(mask2) if m == AVOID_MARK]
    assert [m for i, m in enumerate(mask2) if i not in marked] == [m for i, m in enumerate(mask) if i not in marked]
    before = [TOK.decode(ids[:i]) for i in marked]  # byte-level: the text before each marked token
    assert len(before) == 2 and all(b.endswith("Calling pla") for b in before)
    assert all(TOK.decode([ids[i]]) == "c" for i in marked)
    assert before[1].endswith("No place_order here. Calling pla")  # the second turn: its last mention only
    no_tools = encode_with_mask(TOK, copy.deepcopy(REFUSED), None, None, True)[1]
    assert AVOID_MARK not in no_tools  # nothing is declared, so no call is known to be refused


def test_avoided_tokens_pack_as_avoid_targets():
    from openk2.data.packing import build_row
    from openk2.model.head_loss import AVOID
    ids, mask = encode_with_mask(TOK, copy.deepcopy(REFUSED), TOOLS, None, True)
    x, y, seg = build_row([(ids, mask)], [0], 800)
    n = len(ids) - 1
    want = [t if m == 1 else AVOID - t if m == 2 else IGNORE for t, m in zip(ids[1:], mask[1:])]
    assert y[:n].tolist() == want and (y[n:] == IGNORE).all() and (y <= AVOID).sum() == mask.count(2) == 2


def test_refused_marks_at_the_call_a_prefix_name_and_not_in_arguments():
    """A refused turn that names its tool only in the call: the call's id is marked. A refused name that
    begins a declared one ("plan" of "plan_trip"): the token after it. A mention inside the arguments is
    not a commitment and is not marked."""
    from openk2.tokenizer.sft import AVOID_MARK
    dialog = [{"role": "user", "content": "Plan it."},
              {"role": "assistant", "weight": 0, "content": "",
               "tool_calls": [{"type": "function", "function": {"name": "plan", "arguments": '{"note": "plan"}'}}]},
              {"role": "tool", "tool_call_id": "functions.plan:0", "name": "plan", "content": "Error: no plan."},
              {"role": "assistant", "content": "Done."}]
    ids, mask = encode_with_mask(TOK, dialog, TOOLS + [PLAN_TRIP], None, True)
    marked = [i for i, m in enumerate(mask) if m == AVOID_MARK]
    assert len(marked) == 1
    assert TOK.decode(ids[:marked[0]]).endswith("functions.plan") and TOK.decode([ids[marked[0]]]) == ":"
