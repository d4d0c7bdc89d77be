"""Checkpoints in the Hugging Face K2 layout (the one name/layout table lives in `hf.py`) and training
checkpoints built on it (`state.py`)."""

from openk2.checkpoint.hf import convert, load_hf, save_hf
from openk2.checkpoint.state import latest_checkpoint, restore, save_train_state

__all__ = ["load_hf", "save_hf", "convert", "latest_checkpoint", "restore", "save_train_state"]
