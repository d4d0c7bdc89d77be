"""Corpora: documents in a deterministic order, a held-out split, and a token cache on disk.

Sources give lists of `Doc(name, text)`: `stdlib_documents()` (the default: the standard library's
`.py` files via `sysconfig`, sorted by path; `encodings/` and test folders left out: tests are 19 of 31 MB on
CPython 3.11, full of deliberately odd fixtures, and shipped separately by Debian-style installs),
`text_dir_documents` (`.txt`: a document per file; `.jsonl`: one per line's "text") and
`hf_dataset_documents` (a local Hugging Face dataset, if `datasets` is installed).
`tokenize_to_cache` writes documents as [bos] + ids + [eos], back to back, into one flat `.bin` (uint16
if all ids fit, else uint32) + JSON sidecar, reused while tokenizer and corpus match. Packing: loader.py.
"""

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

CACHE_VERSION = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test", "encodings"}  # tests, and codec tables (data, not code)
# NOTE: tokenizers are duck-typed (encode, bos_id, eos_id), so a tokenizer's fingerprint is how it
# encodes this probe: two that agree here but differ elsewhere would share a cache.
_PROBE = "def f(x):\n    return x + 1  # héllo, 世界 🙂\n\tTabs and CAPS, 12345.67e-8 \r\n"


class Doc(NamedTuple):
    name: str  # unique and stable: it decides the train/val split
    text: str


def _existing(path: str | Path) -> Path:
    if not Path(path).exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    return Path(path)


def _read_utf8(path: Path, strict: bool = True) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        if strict:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return None


def stdlib_documents(include_tests: bool = False) -> list[Doc]:
    """The standard library's `.py` files, sorted by relative path; undecodable files are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # prune, so site-packages is never walked
        rel = Path(folder).relative_to(root)
        names += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    texts = ((n, _read_utf8(root / n, strict=False)) for n in sorted(names))
    return [Doc(n, t) for n, t in texts if t is not None]  # a few test fixtures are latin-1 on purpose


def _jsonl_documents(file: Path, name: str, field: str) -> list[Doc]:
    docs = []
    with open(file, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{i}: bad JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise ValueError(f"{file}:{i}: no string {field!r} field in this line's JSON object")
            docs.append(Doc(f"{name}:{i}", obj[field]))
    return docs


def text_dir_documents(path: str | Path, field: str = "text") -> list[Doc]:
    """`.txt` and `.jsonl` files under `path` (or `path` itself), in sorted relative-path order."""
    root = _existing(path)
    found = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    files = {p.relative_to(root.parent if root.is_file() else root).as_posix(): p
             for p in found if p.suffix in (".txt", ".jsonl")}
    if not files:
        raise ValueError(f"data path {root} is not, and holds no, .txt or .jsonl file")
    docs = []
    for name, file in sorted(files.items()):
        is_jsonl = file.suffix == ".jsonl"
        docs += _jsonl_documents(file, name, field) if is_jsonl else [Doc(name, _read_utf8(file))]
    return docs


def hf_dataset_documents(path: str | Path, split: str = "train", field: str = "text") -> list[Doc]:
    """A Hugging Face dataset saved with `save_to_disk` (a Dataset, or a DatasetDict and a split)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a Hugging Face dataset needs `pip install datasets`") from None
    root = _existing(path)
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, dict):  # a DatasetDict
        if split not in ds:
            raise ValueError(f"{root}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    if field not in ds.column_names:
        raise ValueError(f"{root}: no column {field!r} (columns: {ds.column_names})")
    return [Doc(f"{split}:{i}", text) for i, text in enumerate(ds[field])]


def load_documents(data: str | Path | None = None) -> list[Doc]:
    """`--data`: None for the standard library, a saved HF dataset folder, else text/jsonl files."""
    if data is None:
        return stdlib_documents()
    if any((Path(data) / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
        return hf_dataset_documents(data)
    return text_dir_documents(data)


def _unit_hash(seed: int, name: str) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Sequence[Doc], val_fraction: float, seed: int = 0) -> tuple[list[Doc], list[Doc]]:
    """(train, val), each in corpus order. A document is held out when a seeded hash of its name
    falls below `val_fraction`, so adding or removing other documents never moves it."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    score = [_unit_hash(seed, d.name) for d in docs]
    held = [s < val_fraction for s in score]
    if val_fraction > 0 and not any(held) and len(docs) > 1:
        held[score.index(min(score))] = True  # a tiny corpus still gets a validation document
    train = [d for d, h in zip(docs, held) if not h]
    if not train:
        raise ValueError(f"no training documents left out of {len(docs)}")
    return train, [d for d, h in zip(docs, held) if h]


def fingerprint(docs: Sequence[Doc], tokenizer) -> str:
    """sha256 of the cache format, the tokenizer (special ids, the probe's ids) and every document."""
    h = hashlib.sha256()
    probe = [tokenizer.bos_id, tokenizer.eos_id, list(tokenizer.encode(_PROBE))]
    h.update(json.dumps([CACHE_VERSION, probe]).encode())
    for d in docs:
        name, text = d.name.encode(), d.text.encode("utf-8", "surrogatepass")
        h.update(b"%d:%s%d:" % (len(name), name, len(text)))  # length-prefixed: no ambiguity
        h.update(text)
    return h.hexdigest()


def _valid_cache(path: Path, meta_path: Path, fp: str) -> dict | None:
    try:
        meta = json.loads(meta_path.read_text())
        size_ok = path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if size_ok and meta["fingerprint"] == fp else None


def _narrow_to_uint16(src: Path, chunk: int = 1 << 24) -> Path:
    dst, wide = src.with_suffix(".u16.tmp"), np.memmap(src, dtype=np.uint32, mode="r")
    with open(dst, "wb") as f:
        for i in range(0, len(wide), chunk):
            f.write(wide[i : i + chunk].astype(np.uint16).tobytes())
    del wide
    src.unlink()
    return dst


def _build_cache(docs: Sequence[Doc], tokenizer, path: Path, meta_path: Path, fp: str) -> dict:
    """Stream [bos] + ids + [eos] per document as uint32 (the widest id is unknown until the end),
    narrow to uint16 when all fit, then move the .bin and, last, the sidecar into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, n_tokens, max_id = path.with_name(f"{path.name}.{os.getpid()}.tmp"), 0, 0
    with open(tmp, "wb") as f:
        for d in tqdm(docs, desc=f"tokenizing → {path.name}", unit="doc", disable=None):
            ids = np.array([tokenizer.bos_id, *tokenizer.encode(d.text), tokenizer.eos_id], np.int64)
            f.write(ids.astype(np.uint32).tobytes())
            n_tokens, max_id = n_tokens + len(ids), max(max_id, int(ids.max()))
    dtype = "uint16" if max_id < 2**16 else "uint32"
    os.replace(_narrow_to_uint16(tmp) if dtype == "uint16" else tmp, path)
    meta = dict(version=CACHE_VERSION, dtype=dtype, n_tokens=n_tokens, n_docs=len(docs), fingerprint=fp)
    meta_tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(meta_tmp, meta_path)
    return meta


def tokenize_to_cache(docs: Sequence[Doc], tokenizer, path: str | Path) -> np.memmap:
    """The corpus as one flat read-only memmap of ids at `path` (+ `path.json` sidecar), built once.
    Notes: files are written under per-process temporary names and moved into place, so ranks that
    build the same cache at once cannot leave a torn one behind."""
    if not docs:
        raise ValueError("no documents to tokenize")
    path = Path(path)
    meta_path, fp = path.with_name(path.name + ".json"), fingerprint(docs, tokenizer)
    if (meta := _valid_cache(path, meta_path, fp)) is None:
        meta = _build_cache(docs, tokenizer, path, meta_path, fp)
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
