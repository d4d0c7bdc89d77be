"""SFT: the loss mask token by token, packing that leaks no attention (a packed row's logits equal
each conversation run alone), the packed loader's order and resume, malformed data, and a tiny run
that lowers the masked loss, resumes exactly and leaves a loadable checkpoint."""

import copy
import json

import pytest
import torch
from test_chat import K2_LIKE_TEMPLATE

from openk2.config import PRESETS
from openk2.data.packing import IGNORE, PackedSFTLoader, fit_examples, pack_rows, sft_val_batches
from openk2.model import build_model
from openk2.tokenizer import Tokenizer
from openk2.tokenizer.sft import encode_with_mask, read_jsonl

TOK = Tokenizer({bytes([b]): b for b in range(256)})  # byte-level: ids 0..255, K2's specials from 256
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
     ':2: "tools" must be a list')])
def test_malformed_lines_name_their_line(tmp_path, line, error):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": DIALOG[1:3], "tools": TOOLS}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=error.replace("[", r"\[")):
        read_jsonl(path)


def test_read_jsonl_with_and_without_tools(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": DIALOG, "tools": TOOLS}) + "\n\n" + json.dumps({"messages": DIALOG[:3]}))
    rows = read_jsonl(path)
    assert [t for _, t in rows] == [TOOLS, None] and rows[0][0] == DIALOG


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
