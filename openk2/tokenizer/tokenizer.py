"""K2's tokenizer: tiktoken byte-level BPE, K2's pre-tokenizer regex, 256 reserved special ids.

One file format serves two sources: K2's own folder (`tiktoken.model` + `tokenizer_config.json`,
K2-SPEC §5) and a BPE that `Tokenizer.train` learns on any corpus with HF `tokenizers` and converts
to tiktoken ranks. Encoding always runs through tiktoken; `tokenizers` is imported only to train.
Not here: the chat template and the tool-call parser.

Notes: K2's `tokenization_kimi.py` registers 256 + 2 special ids, but ids n_base+256 and n_base+257
(163840, 163841) are unnamed reserved tokens beyond the 163,840-row embedding. We register only the
256 that have rows, so `n_vocab == n_base + 256 == config.vocab_size` and every id we emit indexes
the embedding; the one difference is that those two `<|reserved_token_N|>` strings stay text.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

# ref: K2-SPEC §5, copied verbatim from tokenization_kimi.py. `&&` is class intersection (Han taken
# out of the letter classes); tiktoken's fancy-regex and the Oniguruma engine of HF `tokenizers`
# both accept it, so training and encoding split text with the very same pattern.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

N_RESERVED = 256  # special ids n_base … n_base + 255
MAX_ENCODE_CHARS = 400_000  # K2 encodes at most this many chars per tiktoken call
MAX_RUN_CHARS = 25_000  # … and cuts longer runs of whitespace / non-whitespace (tiktoken#195)

# name -> (offset from n_base, HF "special" flag), as in K2-Instruct's tokenizer_config.json
K2_SPECIALS: dict[str, tuple[int, bool]] = {
    "[BOS]": (0, True), "[EOS]": (1, True), "<|im_end|>": (2, True), "<|im_user|>": (3, True),
    "<|im_assistant|>": (4, True), "<|start_header_id|>": (6, True), "<|end_header_id|>": (7, True),
    "[EOT]": (9, True), "<|im_system|>": (10, True), "<|tool_calls_section_begin|>": (11, False),
    "<|tool_calls_section_end|>": (12, False), "<|tool_call_begin|>": (13, False),
    "<|tool_call_argument_begin|>": (14, False), "<|tool_call_end|>": (15, False),
    "<|im_middle|>": (17, True), "[UNK]": (254, True), "[PAD]": (255, True),
}
K2_ADDITIONAL = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                 "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]
HF_MAX_LENGTH = int(1e30)  # transformers' VERY_LARGE_INTEGER, K2's `model_max_length`


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse `tiktoken.model`: `base64(token bytes) rank` per line, blank lines skipped.

    Notes: not `tiktoken.load.load_tiktoken_bpe`: it caches contents by *path* in a temp dir, so a
    file rewritten at the same path would load stale."""
    ranks = {}
    for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: expected 'base64 rank', got {line[:80]!r}") from e
    return ranks


def check_ranks(ranks: dict[bytes, int]) -> None:
    """Ranks are ids, so they must be 0 … n-1 without gaps; all 256 single bytes must be tokens."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"ranks must be exactly 0..{len(ranks) - 1} (they are the token ids)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"byte-level BPE needs all 256 single bytes; missing {missing[:8]} …")


def special_table(n_base: int, named: dict[int, tuple[str, bool]]) -> dict[str, int]:
    """All 256 special names -> ids: `named` (absolute id -> (name, flag)), else reserved names."""
    return {named[i][0] if i in named else f"<|reserved_token_{i}|>": i
            for i in range(n_base, n_base + N_RESERVED)}


def k2_named(n_base: int) -> dict[int, tuple[str, bool]]:
    """K2's 17 named special tokens at their offsets from the first special id."""
    return {n_base + off: (name, flag) for name, (off, flag) in K2_SPECIALS.items()}


def read_named(path: Path, n_base: int) -> dict[int, tuple[str, bool]]:
    """Named specials from `tokenizer_config.json`'s `added_tokens_decoder` (K2's when absent)."""
    added = json.loads(path.read_text("utf-8")).get("added_tokens_decoder") if path.exists() else None
    if not added:
        return k2_named(n_base)
    named = {int(i): (t["content"], bool(t.get("special", True))) for i, t in added.items()}
    bad = [i for i in named if not n_base <= i < n_base + N_RESERVED]
    if bad:
        raise ValueError(f"{path}: added tokens {bad[:4]} lie outside the special ids "
                         f"{n_base}..{n_base + N_RESERVED - 1}")
    return named


def split_long(text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """K2's cuts: ≤`max_chars` pieces, then every `max_run` chars inside longer (non-)space runs.

    Notes: the same cut points as `_split_whitespaces_or_nonwhitespaces` in tokenization_kimi.py
    (a run of L chars starting at a is cut at a + k·max_run < a + L), found with one linear regex
    instead of a Python loop over every character. The lookbehinds anchor matches at run starts.
    """
    long_run = re.compile(rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}")
    for start in range(0, len(text), max_chars):
        chunk = text[start:start + max_chars]
        cuts = [m.start() + k for m in long_run.finditer(chunk) for k in range(max_run, len(m[0]), max_run)]
        yield from (chunk[a:b] for a, b in zip([0, *cuts], [*cuts, len(chunk)]))


def _byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in char for each byte (HF ByteLevel's alphabet): char -> byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in keep)})
    return table


_BYTE_OF = _byte_chars()


def hf_token_bytes(token: str) -> bytes:
    """The bytes behind a byte-level HF token string (e.g. 'Ġdef' -> b' def')."""
    return bytes(_BYTE_OF[c] for c in token)


def ranks_from_hf(vocab: dict[str, int]) -> dict[bytes, int]:
    """HF BPE vocab -> tiktoken ranks: bytes 0–255 first, then merged tokens in merge order.

    Notes: the trainer gives each new token the next id, so id order is merge order; tiktoken merges
    the adjacent pair whose concatenation ranks lowest, which replays the merges (ids identical on
    200 held-out stdlib files, ~1M tokens, and in tests/test_tokenizer.py)."""
    merged = sorted((i, hf_token_bytes(t)) for t, i in vocab.items() if len(hf_token_bytes(t)) > 1)
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({tok: 256 + r for r, (_, tok) in enumerate(merged)})
    check_ranks(ranks)
    return ranks


def train_bpe(texts: Iterable[str], n_base: int, min_frequency: int = 2):
    """Train a byte-level BPE of `n_base` tokens (256 bytes + merges) with HF `tokenizers`.

    Notes: pieces come from K2's exact `PAT_STR` (Oniguruma accepts its `&&` and `\\p{Han}` and
    splits as tiktoken does, except on code points its Unicode tables and tiktoken's assign
    differently), then ByteLevel maps bytes to printable chars. Returns the HF tokenizer."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_base, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


class Tokenizer:
    """tiktoken `Encoding` over base ranks 0 … n_base-1 and special ids n_base … n_base+255."""

    def __init__(self, ranks: dict[bytes, int], named: dict[int, tuple[str, bool]] | None = None,
                 name: str = "openk2"):
        check_ranks(ranks)
        self.ranks, self.n_base = dict(ranks), len(ranks)
        self.named = k2_named(self.n_base) if named is None else dict(named)
        self._special = special_table(self.n_base, self.named)
        self._enc = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                      special_tokens=self._special)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a K2-format folder (`tiktoken.model`, optional `tokenizer_config.json`)."""
        path = Path(path)
        model = path / "tiktoken.model"
        if not model.is_file():
            raise FileNotFoundError(f"{path} has no tiktoken.model (K2 tokenizer folder expected)")
        ranks = read_ranks(model)
        return cls(ranks, read_named(path / "tokenizer_config.json", len(ranks)), name=path.name or "k2")

    @classmethod
    def byte_level(cls, vocab_size: int | None = None, where: str = "the checkpoint") -> Tokenizer:
        """UTF-8 bytes as ids 0..255 and K2's reserved specials from 256: the text of a checkpoint that
        ships no tokenizer. vocab_size: the model's, which must hold those 512 rows (else an error)."""
        if vocab_size is not None and vocab_size < 256 + N_RESERVED:
            raise ValueError(f"{where} has no tokenizer and vocab_size {vocab_size} < {256 + N_RESERVED} "
                             "(byte-level text + specials)")
        return cls({bytes([b]): b for b in range(256)})

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Learn a BPE whose n_base + 256 special ids fill `vocab_size` embedding rows.
        Notes: a corpus too small for n_base - 256 merges yields fewer; read `n_vocab` afterwards."""
        if vocab_size <= 256 + N_RESERVED:  # no room for a merge: byte-level, if it fits at all
            if vocab_size < 256 + N_RESERVED:
                raise ValueError(f"vocab_size {vocab_size} cannot hold 256 bytes + {N_RESERVED} special ids")
            return cls.byte_level()
        return cls(ranks_from_hf(train_bpe(texts, vocab_size - N_RESERVED, min_frequency).get_vocab()))

    def save(self, path: str | Path, model_max_length: int = HF_MAX_LENGTH) -> Path:
        """Write `tiktoken.model` and `tokenizer_config.json` as K2 ships them; returns `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        ranks = sorted(self.ranks.items(), key=lambda item: item[1])
        lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks)
        (path / "tiktoken.model").write_text("".join(lines), "utf-8")
        added = {str(i): {"content": n, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": flag}
                 for i, (n, flag) in sorted(self.named.items())}
        roles = {"bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]"}
        config = {"added_tokens_decoder": added,
                  "additional_special_tokens": [n for n in K2_ADDITIONAL if n in self._special],
                  **{role: n for role, n in roles.items() if n in self._special},
                  "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
                  "tokenizer_class": "TikTokenTokenizer"}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        return path

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token strings stay plain text unless `allow_special` (as K2's encode)."""
        ids: list[int] = []
        for piece in split_long(text):
            ids += (self._enc.encode(piece, allowed_special="all") if allow_special
                    else self._enc.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:  # exact bytes, even mid-character
        return self._enc.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; a token sequence that splits a UTF-8 character decodes to U+FFFD there."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def n_vocab(self) -> int:
        return self._enc.n_vocab

    @property
    def special_ids(self) -> dict[str, int]:
        """All 256 special names (named and `<|reserved_token_N|>`) -> id."""
        return dict(self._special)

    def token_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"{name!r} is not a special token of this tokenizer")
        return self._special[name]

    # NOTE: K2's chat turns end with `<|im_end|>`, not `[EOS]`: generation must stop on both
    bos_id = property(lambda self: self.token_id("[BOS]"))
    eos_id = property(lambda self: self.token_id("[EOS]"))
