"""Data: corpora, the held-out split, the token cache, and the packed, resumable, rank-aware loader."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from openk2.data import (
    Doc,
    PackedLoader,
    hf_dataset_documents,
    load_documents,
    split_documents,
    stdlib_documents,
    text_dir_documents,
    tokenize_to_cache,
    val_batches,
)


class ByteTokenizer:
    """ids = UTF-8 bytes (+ offset); records every text it encodes."""

    def __init__(self, bos_id=256, eos_id=257, offset=0):
        self.bos_id, self.eos_id, self.offset, self.seen = bos_id, eos_id, offset, []

    def encode(self, text: str) -> list[int]:
        self.seen.append(text)
        return [b + self.offset for b in text.encode("utf-8")]


def expected_stream(docs, tok):
    return [i for d in docs for i in [tok.bos_id, *tok.encode(d.text), tok.eos_id]]


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- corpora ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_documents()


def test_stdlib_corpus_is_nonempty_sorted_and_deterministic(stdlib):
    names = [d.name for d in stdlib]
    assert len(stdlib) > 100 and sum(len(d.text) for d in stdlib) > 1_000_000
    assert names == sorted(names) and len(set(names)) == len(names)
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= set(names)
    assert not any(part in ("test", "tests", "site-packages") for n in names for part in n.split("/"))
    assert "def makedirs(" in dict(stdlib)["os.py"]
    again = stdlib_documents()
    assert [d.name for d in again] == names and again[:50] == stdlib[:50]


def test_split_is_disjoint_stable_and_seeded(stdlib):
    train, val = split_documents(stdlib, 0.1, seed=0)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == len(stdlib)
    assert 0.05 < len(val) / len(stdlib) < 0.15
    assert [d.name for d in val] == [d.name for d in stdlib if d in set(val)]  # corpus order kept
    # adding documents never moves an existing one across the split
    extra = [Doc(f"new/{i}.py", "x = 1\n") for i in range(50)]
    train2, val2 = split_documents(extra[:25] + stdlib + extra[25:], 0.1, seed=0)
    assert [d for d in val2 if not d.name.startswith("new/")] == val
    assert split_documents(stdlib, 0.1, seed=0) == (train, val)
    assert split_documents(stdlib, 0.1, seed=1)[1] != val


def test_split_edge_cases():
    docs = [Doc(f"d{i}", "t") for i in range(3)]
    train, val = split_documents(docs, 0.001)
    assert len(val) == 1 and len(train) == 2  # a tiny corpus still gets a validation document
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_text_dir_reads_txt_and_jsonl_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file, ünïcode\n")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "line one"}\n\n{"text": "line three", "id": 3}\n')
    (tmp_path / "ignored.csv").write_text("x,y\n")
    docs = text_dir_documents(tmp_path)
    assert docs == [
        Doc("a.txt", "first file, ünïcode\n"),
        Doc("b.txt", "second file\n"),
        Doc("sub/c.jsonl:1", "line one"),
        Doc("sub/c.jsonl:3", "line three"),
    ]
    assert text_dir_documents(tmp_path / "sub" / "c.jsonl") == [Doc("c.jsonl:1", "line one"),
                                                                 Doc("c.jsonl:3", "line three")]
    assert load_documents(tmp_path) == docs


def test_text_dir_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "oops",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad JSON"):
        text_dir_documents(tmp_path)
    bad.write_text('{"text": "fine"}\n{"content": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no string 'text' field"):
        text_dir_documents(tmp_path)
    bad.write_text('["a list"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no string 'text' field"):
        text_dir_documents(tmp_path)
    bad.unlink()
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        text_dir_documents(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_dir_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no, .txt or .jsonl"):
        text_dir_documents(tmp_path / "empty")


def test_hf_dataset_needs_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        hf_dataset_documents(tmp_path)


def test_hf_dataset_documents_with_a_fake_datasets(monkeypatch, tmp_path):
    class FakeDataset:
        column_names = ["text", "id"]

        def __getitem__(self, column):
            return {"text": ["alpha", "beta"], "id": [0, 1]}[column]

    fake = types.SimpleNamespace(load_from_disk=lambda path: {"train": FakeDataset()})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert load_documents(tmp_path) == [Doc("train:0", "alpha"), Doc("train:1", "beta")]
    with pytest.raises(ValueError, match="no split 'test'"):
        hf_dataset_documents(tmp_path, split="test")
    with pytest.raises(ValueError, match="no column 'body'"):
        hf_dataset_documents(tmp_path, field="body")


# --- token cache --------------------------------------------------------------------------------


DOCS = [Doc("a", "hello"), Doc("b", ""), Doc("c", "wörld\n")]


def test_cache_contents_and_sidecar(tmp_path):
    tok = ByteTokenizer()
    ids = tokenize_to_cache(DOCS, tok, tmp_path / "toks.bin")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == expected_stream(DOCS, ByteTokenizer())
    meta = json.loads((tmp_path / "toks.bin.json").read_text())
    assert meta["n_tokens"] == len(ids) == 5 + 2 + 0 + 2 + 7 + 2 and meta["n_docs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toks.bin", "toks.bin.json"]  # no temp files


def test_cache_is_reused_then_invalidated(tmp_path):
    path = tmp_path / "toks.bin"
    tok = ByteTokenizer()
    tokenize_to_cache(DOCS, tok, path)
    stamp = (path.stat().st_mtime_ns, (tmp_path / "toks.bin.json").stat().st_mtime_ns)
    tok.seen.clear()
    again = tokenize_to_cache(DOCS, tok, path)
    assert len(tok.seen) == 1  # only the fingerprint probe, no document re-encoded
    assert (path.stat().st_mtime_ns, (tmp_path / "toks.bin.json").stat().st_mtime_ns) == stamp
    assert again.tolist() == expected_stream(DOCS, ByteTokenizer())
    # another tokenizer (different special ids) or another corpus rebuilds it
    other = tokenize_to_cache(DOCS, ByteTokenizer(bos_id=300, eos_id=301), path)
    assert other[0] == 300 and other.tolist() == expected_stream(DOCS, ByteTokenizer(300, 301))
    edited = [DOCS[0], Doc("b", "!"), DOCS[2]]
    assert tokenize_to_cache(edited, tok, path).tolist() == expected_stream(edited, ByteTokenizer())
    # a truncated .bin is not trusted
    path.write_bytes(path.read_bytes()[:-2])
    assert len(tokenize_to_cache(edited, tok, path)) == len(expected_stream(edited, ByteTokenizer()))


def test_cache_widens_to_uint32_for_large_ids(tmp_path):
    tok = ByteTokenizer(bos_id=70_000, eos_id=70_001, offset=65_000)
    ids = tokenize_to_cache(DOCS, tok, tmp_path / "wide.bin")
    assert ids.dtype == np.uint32 and ids.tolist() == expected_stream(DOCS, tok)
    with pytest.raises(ValueError, match="no documents"):
        tokenize_to_cache([], tok, tmp_path / "none.bin")


# --- loader -----------------------------------------------------------------------------------


def arange_stream(n):
    """Token id = position, so a row's first id says which window it is."""
    return np.arange(n, dtype=np.uint32)


def test_windows_shift_and_cover_each_epoch_once():
    T, B = 4, 3
    tokens = arange_stream(10 * T + 3)  # 10 windows, 2 tokens left over
    loader = PackedLoader(tokens, B, T, seed=0)
    assert loader.n_windows == 10
    starts = []
    for x, y in batches(loader, 3):  # 9 windows: most of epoch 0
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one
        assert torch.equal(x, x[:, :1] + torch.arange(T))  # a row is one contiguous window
        assert (x[:, 0] % T == 0).all()
        starts += (x[:, 0] // T).tolist()
    x, _ = loader.next_batch()  # the last window of epoch 0, then two of epoch 1
    assert sorted(starts + [int(x[0, 0]) // T]) == list(range(10))
    assert starts != sorted(starts)  # shuffled
    assert (loader.epoch, loader.position) == (1, 2)


def test_documents_are_packed_back_to_back_with_boundaries(tmp_path):
    docs = [Doc("a", "ab"), Doc("b", "c")]
    ids = tokenize_to_cache(docs, ByteTokenizer(), tmp_path / "t.bin")  # 256 97 98 257 256 99 257
    x, y = PackedLoader(ids, 2, 3, seed=0).next_batch()
    rows = sorted(zip(x.tolist(), y.tolist()))
    assert rows == [([256, 97, 98], [97, 98, 257]), ([257, 256, 99], [256, 99, 257])]


@pytest.mark.parametrize("n_tokens", [7 * 4 + 1, 2 * 4 + 1])  # 7 windows; 2 (< one global batch)
def test_resume_continues_exactly_across_epochs(n_tokens):
    tokens, B, T = arange_stream(n_tokens), 3, 4
    reference = batches(PackedLoader(tokens, B, T, seed=5), 12)
    for k in (0, 2, 5):
        first = PackedLoader(tokens, B, T, seed=5)
        assert_same(batches(first, k), reference[:k])
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint file
        resumed = PackedLoader(tokens, B, T, seed=0)
        resumed.load_state_dict(state)
        assert_same(batches(resumed, 12 - k), reference[k:])
    assert first.epoch >= 2  # the runs crossed epoch boundaries


def test_two_ranks_see_what_one_rank_with_twice_the_batch_sees():
    tokens, B, T = arange_stream(11 * 4 + 1), 3, 4
    single = batches(PackedLoader(tokens, 2 * B, T, seed=3), 6)
    ranks = [PackedLoader(tokens, B, T, seed=3, rank=r, world_size=2) for r in range(2)]
    for x, y in single:
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not torch.equal(x0, x1)
    # and a state saved by one world size resumes under another with the same global batch
    one = PackedLoader(tokens, 2 * B, T, seed=3)
    batches(one, 2)
    rank1 = PackedLoader(tokens, B, T, rank=1, world_size=2)
    rank1.load_state_dict(one.state_dict())
    assert torch.equal(rank1.next_batch()[0], one.next_batch()[0][B:])


def test_order_depends_on_seed_and_epoch():
    tokens = arange_stream(20 * 4 + 1)
    a = torch.cat([x for x, _ in batches(PackedLoader(tokens, 5, 4, seed=0), 8)])[:, 0]
    b = torch.cat([x for x, _ in batches(PackedLoader(tokens, 5, 4, seed=1), 8)])[:, 0]
    assert not torch.equal(a, b)
    assert not torch.equal(a[:20], a[20:])  # epochs 0 and 1 differ
    assert torch.equal(a[:20].sort().values, a[20:].sort().values)


def test_val_batches_are_fixed_consecutive_and_rank_split():
    tokens, B, T = arange_stream(5 * 4 + 1), 2, 4
    val = val_batches(tokens, B, T, 3)
    starts = [(x[:, 0] // T).tolist() for x, _ in val]
    assert starts == [[0, 1], [2, 3], [4, 0]]  # in order, wrapping on a short held-out stream
    assert all(torch.equal(y, x + 1) for x, y in val)
    per_rank = [val_batches(tokens, 1, T, 3, rank=r, world_size=2) for r in range(2)]
    for i, (x, _) in enumerate(val):
        assert torch.equal(torch.cat([per_rank[0][i][0], per_rank[1][i][0]]), x)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"corpus too short: 8 tokens.*seq_len=8 needs 9"):
        PackedLoader(arange_stream(8), 1, 8)
    PackedLoader(arange_stream(9), 1, 8)  # exactly one sequence is enough
    with pytest.raises(ValueError, match="corpus too short"):
        val_batches(arange_stream(3), 1, 8, 1)
    with pytest.raises(ValueError, match="rank 2"):
        PackedLoader(arange_stream(100), 1, 8, rank=2, world_size=2)
    state = PackedLoader(arange_stream(100), 1, 8).state_dict()
    with pytest.raises(ValueError, match="not the same token stream"):
        PackedLoader(arange_stream(200), 1, 8).load_state_dict(state)


def test_stdlib_end_to_end(stdlib, tmp_path):
    train, val = split_documents(stdlib[:40], 0.2, seed=0)
    tok = ByteTokenizer()
    train_ids = tokenize_to_cache(train, tok, tmp_path / "train.bin")
    val_ids = tokenize_to_cache(val, tok, tmp_path / "val.bin")
    assert len(train_ids) == sum(len(d.text.encode()) + 2 for d in train)
    x, y = PackedLoader(train_ids, 4, 64, seed=0).next_batch()
    assert x.shape == (4, 64) and int(x.max()) <= 257
    assert len(val_batches(val_ids, 4, 64, 2)) == 2
