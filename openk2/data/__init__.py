"""Pretraining data: corpora → a cached memmap of token ids → packed, resumable, rank-aware batches.

Tokenizers are duck-typed (`encode(text) -> list[int]`, `bos_id`, `eos_id`); nothing here imports
`openk2.tokenizer`.
"""

from openk2.data.corpus import (
    Doc,
    hf_dataset_documents,
    load_documents,
    split_documents,
    stdlib_documents,
    text_dir_documents,
    tokenize_to_cache,
)
from openk2.data.loader import PackedLoader, val_batches

__all__ = [
    "Doc",
    "PackedLoader",
    "hf_dataset_documents",
    "load_documents",
    "split_documents",
    "stdlib_documents",
    "text_dir_documents",
    "tokenize_to_cache",
    "val_batches",
]
