"""Tokenizer: K2-format folders, special ids, round trips, long inputs, the trained BPE.

Expected special ids are written out here from K2-SPEC §5 (absolute ids of K2-Instruct), not taken
from `openk2.tokenizer`, so a wrong offset table there cannot agree with itself.
"""

import base64
import json
import random
import sysconfig
from pathlib import Path

import pytest

from openk2.tokenizer import PAT_STR, Tokenizer
from openk2.tokenizer.tokenizer import hf_token_bytes, ranks_from_hf, split_long, train_bpe

# K2-SPEC §5: added_tokens_decoder of K2-Instruct (id, content, special)
K2_TABLE = [
    (163584, "[BOS]", True), (163585, "[EOS]", True), (163586, "<|im_end|>", True),
    (163587, "<|im_user|>", True), (163588, "<|im_assistant|>", True),
    (163590, "<|start_header_id|>", True), (163591, "<|end_header_id|>", True), (163593, "[EOT]", True),
    (163594, "<|im_system|>", True), (163595, "<|tool_calls_section_begin|>", False),
    (163596, "<|tool_calls_section_end|>", False), (163597, "<|tool_call_begin|>", False),
    (163598, "<|tool_call_argument_begin|>", False), (163599, "<|tool_call_end|>", False),
    (163601, "<|im_middle|>", True), (163838, "[UNK]", True), (163839, "[PAD]", True),
]
K2_BASE = 163584
HELLO, SHIJIE = b"Hello", "世界".encode()
# a few merges on top of the bytes; "Hello世界" is a token, reachable by merges, that only an
# unsplit piece could produce
MERGES = [b"He", b"ll", b"llo", HELLO, SHIJIE[:2], SHIJIE[:3], SHIJIE[3:5], SHIJIE[3:], SHIJIE,
          HELLO + SHIJIE, b" t", b" th", b" the"]


def _write_folder(path: Path, tokens: list[bytes], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]
    blank = "\n\n"  # K2's reader skips blank lines
    (path / "tiktoken.model").write_text("\n".join(lines[:100]) + blank + "\n".join(lines[100:]) + "\n")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _k2_config(base: int) -> dict:
    """K2's tokenizer_config.json, ids shifted from K2's base vocabulary to `base`."""
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    return {"added_tokens_decoder": {str(i - K2_BASE + base): {"content": c, **entry, "special": s}
                                     for i, c, s in K2_TABLE},
            "bos_token": "[BOS]", "eos_token": "[EOS]", "tokenizer_class": "TikTokenTokenizer"}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Tokenizer:
    tokens = [bytes([b]) for b in range(256)] + MERGES
    return Tokenizer.from_dir(_write_folder(tmp_path_factory.mktemp("small"), tokens))


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """~150 KB of stdlib source to train on and ~40 KB held out, plus non-code text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [t for p in sorted(root.glob("*.py"))[:80] if len(t := p.read_text("utf-8")) < 25_000]
    n = next(i for i in range(len(texts)) if sum(map(len, texts[:i + 1])) > 150_000)
    prose = "Ünïcode naïve café — 日本語のテキスト, 中文文本 and 한국어; emoji 🙂👍🏽 x² ١٢٣ I'M HE'LL\r\n\t"
    return texts[:n] + [prose] * 20, texts[n:n + 4] + [prose]


@pytest.fixture(scope="module")
def trained(corpus):
    hf = train_bpe(corpus[0], 1024 - 256)
    return hf, Tokenizer(ranks_from_hf(hf.get_vocab()))


def test_k2_sized_folder_has_k2_special_ids(tmp_path):
    # 256 bytes + 163,328 stand-in merged tokens: the real K2 base vocabulary size
    tokens = [bytes([b]) for b in range(256)] + [i.to_bytes(3, "big") for i in range(256, K2_BASE)]
    tok = Tokenizer.from_dir(_write_folder(tmp_path, tokens, _k2_config(K2_BASE)))
    for i, name, _ in K2_TABLE:
        assert tok.token_id(name) == i
    assert tok.bos_id == 163584 and tok.eos_id == 163585
    assert tok.token_id("<|reserved_token_163589|>") == 163589
    assert tok.token_id("<|reserved_token_163837|>") == 163837
    assert tok.n_vocab == 163840  # = config.json vocab_size: every id has an embedding row
    assert sorted(tok.special_ids.values()) == list(range(163584, 163840))


def test_default_names_without_config_match_k2_offsets(small):
    base = 256 + len(MERGES)
    assert small.n_vocab == base + 256 and small.n_base == base
    for i, name, _ in K2_TABLE:
        assert small.token_id(name) == i - K2_BASE + base
    named = {i - K2_BASE + base for i, _, _ in K2_TABLE}
    reserved = {i for n, i in small.special_ids.items() if n == f"<|reserved_token_{i}|>"}
    assert reserved == set(range(base, base + 256)) - named and len(reserved) == 256 - 17
    with pytest.raises(KeyError, match="not a special token"):
        small.token_id("<|im_start|>")


def test_names_come_from_config(tmp_path):
    tokens = [bytes([b]) for b in range(256)]
    config = {"added_tokens_decoder": {"256": {"content": "<s>", "special": True},
                                       "257": {"content": "</s>", "special": False}}}
    tok = Tokenizer.from_dir(_write_folder(tmp_path, tokens, config))
    assert tok.token_id("<s>") == 256 and tok.token_id("</s>") == 257
    assert tok.token_id("<|reserved_token_258|>") == 258 and "[BOS]" not in tok.special_ids


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)
    bytes_only = [bytes([b]) for b in range(256)]
    bad = {"added_tokens_decoder": {"255": {"content": "[BOS]", "special": True}}}
    with pytest.raises(ValueError, match="outside the special ids"):
        Tokenizer.from_dir(_write_folder(tmp_path / "a", bytes_only, bad))
    with pytest.raises(ValueError, match="needs all 256 single bytes"):
        Tokenizer.from_dir(_write_folder(tmp_path / "b", bytes_only[1:] + [b"ab"]))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tiktoken.model").write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:2"):
        Tokenizer.from_dir(tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tiktoken.model").write_text("QQ== 0\nQg== 2\n")
    with pytest.raises(ValueError, match="exactly 0..1"):
        Tokenizer.from_dir(tmp_path / "d")


def test_pat_str_splits_han_from_latin(small):
    ids = small.encode("Hello世界")
    assert [small.decode_bytes([i]) for i in ids] == [HELLO, SHIJIE]
    # the unsplit piece would be one token: the vocabulary can make it, only the regex prevents it
    assert small.decode_bytes([256 + MERGES.index(HELLO + SHIJIE)]) == HELLO + SHIJIE
    assert [small.decode_bytes([i]) for i in small.encode(" the")] == [b" the"]


def test_trainer_regex_splits_like_reference_engine():
    regex = pytest.importorskip("regex")  # Python's regex with V1 reads `&&` as tiktoken does
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated")
    rng = random.Random(0)
    pool = "aZé\u0301ſK'sS'LL 12٣²&-.世界テ한🙂\n\r\t\u3000\u00a0"
    for _ in range(300):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        assert [p for p, _ in split.pre_tokenize_str(s)] == regex.findall(PAT_STR, s, flags=regex.V1)
    assert regex.findall(PAT_STR, "Hello世界 a&&b", flags=regex.V1) == ["Hello", "世界", " a", "&&", "b"]


def _random_text(rng: random.Random, n: int) -> str:
    """Random code points from every plane (no surrogates: a Python str cannot hold them)."""
    picks = [lambda: rng.randint(0, 0x7F), lambda: rng.randint(0x80, 0xD7FF),
             lambda: rng.randint(0xE000, 0x10FFFF), lambda: rng.choice([0x301, 0x1F600, 0x4E16, 0x20])]
    return "".join(chr(rng.choice(picks)()) for _ in range(n))


@pytest.mark.parametrize("which", ["small", "trained"])
def test_unicode_round_trip(which, small, trained):
    tok = small if which == "small" else trained[1]
    rng = random.Random(1)
    fixed = "emoji 🙂👍🏽‍ CJK 中文 日本語 한국어 e\u0301 a\u0308\u0323 \x00\x7f <|im_end|> [BOS]\r\n"
    for text in [fixed, "", " ", "\n\n\n", *(_random_text(rng, rng.randint(1, 200)) for _ in range(50))]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.n_base for i in ids)
        assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()


def test_random_bytes_decode(small):
    rng = random.Random(2)
    for _ in range(50):
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        ids = list(raw)  # ranks 0..255 are the single bytes in byte order
        assert small.decode_bytes(ids) == raw
        assert small.decode(ids) == raw.decode("utf-8", errors="replace")


def test_special_tokens_only_when_allowed(small):
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>[EOS]"
    plain = small.encode(text)
    assert all(i < small.n_base for i in plain) and small.decode(plain) == text
    ids = small.encode(text, allow_special=True)
    sp = small.special_ids
    assert [i for i in ids if i >= small.n_base] == [sp["<|im_user|>"], sp["<|im_middle|>"],
                                                     sp["<|im_end|>"], sp["[EOS]"]]
    assert small.decode(ids) == text


def _k2_split(s: str, max_run: int):
    """tokenization_kimi.py's `_split_whitespaces_or_nonwhitespaces`, as the reference."""
    run, is_space, start = 0, s[0].isspace() if s else False, 0
    for i, c in enumerate(s):
        if is_space ^ c.isspace():
            run, is_space = 1, c.isspace()
        else:
            run += 1
            if run > max_run:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def test_split_long_matches_k2_cuts():
    rng = random.Random(3)
    for _ in range(300):
        parts = ["a", "b", " ", "\n", "xy", "    ", "ab" * 5]
        s = "".join(rng.choice(parts) for _ in range(rng.randint(0, 60)))
        pieces = list(split_long(s, max_chars=37, max_run=7))
        expect = [p for i in range(0, len(s), 37) for p in _k2_split(s[i:i + 37], 7)]
        assert [p for p in pieces if p] == [p for p in expect if p] and "".join(pieces) == s


def test_long_input(small):
    text = "a" * 60_000 + " " * 60_000 + "Hello世界 " * 50_000  # 720k chars: two 400k calls
    ids = small.encode(text)
    assert small.decode(ids) == text
    assert ids[-2:] == small.encode("世界 ")


def test_trained_tiktoken_equals_tokenizers(trained, corpus):
    hf, tok = trained
    assert tok.n_vocab == 1024 and tok.n_base == 768
    ranks = {tok.decode_bytes([i]): i for i in range(tok.n_base)}
    for text in corpus[1]:
        ids = tok.encode(text)
        assert ids == [ranks[hf_token_bytes(t)] for t in hf.encode(text).tokens]
        assert tok.decode(ids) == text
    code = corpus[1][0]
    assert len(tok.encode(code)) < 0.45 * len(code.encode())  # the merges are actually used


def test_trained_has_k2_special_names(trained):
    tok = trained[1]
    for i, name, _ in K2_TABLE:
        assert tok.token_id(name) == i - K2_BASE + 768
    assert max(tok.special_ids.values()) == tok.n_vocab - 1 == 1023


def test_train_entry_point_and_save_load_identity(tmp_path, corpus):
    tok = Tokenizer.train(corpus[0][:20], vocab_size=600)
    assert tok.n_vocab == 600
    again = Tokenizer.from_dir(tok.save(tmp_path / "tok"))
    assert again.n_vocab == tok.n_vocab and again.special_ids == tok.special_ids
    for text in corpus[1]:
        assert again.encode(text) == tok.encode(text)
        with_end = again.encode(text + "<|im_end|>", allow_special=True)
        assert with_end[-1] == again.token_id("<|im_end|>")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert {int(i): (e["content"], e["special"]) for i, e in config["added_tokens_decoder"].items()} == {
        i - K2_BASE + 344: (c, s) for i, c, s in K2_TABLE}
    assert config["tokenizer_class"] == "TikTokenTokenizer" and config["bos_token"] == "[BOS]"
    assert config["additional_special_tokens"] == [
        "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
        "[EOT]", "<|im_system|>", "<|im_middle|>"]  # K2-SPEC §5
    with pytest.raises(ValueError, match="cannot hold"):
        Tokenizer.train(["abc"], vocab_size=511)
    byte_level = Tokenizer.train(["abc"], vocab_size=512)  # no room for merges: bytes only
    assert byte_level.n_vocab == 512 and byte_level.encode("héllo") == list("héllo".encode())


def test_k2_folder_save_is_byte_identical(small, tmp_path):
    tokens = [bytes([b]) for b in range(256)] + MERGES
    src = _write_folder(tmp_path / "src", tokens, _k2_config(256 + len(MERGES)))
    out = Tokenizer.from_dir(src).save(tmp_path / "out")
    model = (src / "tiktoken.model").read_text().replace("\n\n", "\n")
    assert (out / "tiktoken.model").read_text() == model
    assert Tokenizer.from_dir(out).special_ids == small.special_ids


def test_byte_level_fallback():
    """A checkpoint without a tokenizer reads text as UTF-8 bytes, K2's specials from 256; its model
    must hold those 512 rows."""
    tok = Tokenizer.byte_level(512)
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21] and tok.decode([0xC3, 0xA9, 0x21]) == "é!"
    assert tok.token_id("<|im_end|>") >= 256
    with pytest.raises(ValueError, match="511 < 512"):
        Tokenizer.byte_level(511, "runs/x")
