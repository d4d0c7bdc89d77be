"""Text <-> token ids: K2's tiktoken-format BPE (load K2's folder, or train our own on any corpus)."""

from openk2.tokenizer.tokenizer import PAT_STR, Tokenizer

__all__ = ["PAT_STR", "Tokenizer"]
