"""Checkpoints in the Hugging Face K2 layout (the one name/layout table lives in `hf.py`) and training
checkpoints built on it (`state.py`)."""

from openk2.checkpoint.hf import dequant_fp8, dequant_int4, load_hf, quant_fp8, quant_int4, save_hf
from openk2.checkpoint.state import latest_checkpoint, save_train_state

__all__ = ["load_hf", "save_hf", "dequant_fp8", "quant_fp8", "dequant_int4", "quant_int4", "latest_checkpoint",
           "save_train_state"]
