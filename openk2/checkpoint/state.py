"""Training checkpoints: a Hugging Face folder (fp32 weights, the tokenizer) plus `train_state.pt`
(step, optimizer, loader, RNG, config), or the weights and optimizer in DCP's shards
(`sharded.py`) with the config, tokenizer and the rest of `train_state.pt`; one folder per step under
`checkpoints/`, and the `latest` pointer beside them. Written so that a kill at any moment loses at
most the checkpoint being written: `train_state.pt` goes last and `latest` after it, each to a
temporary file renamed into place; a folder without `train_state.pt` is incomplete and never resumed
from.
"""

import os
from pathlib import Path

import torch

from openk2.checkpoint.hf import save_hf, write_config


def save_train_state(folder: Path, model, tokenizer, state: dict, weights: bool = True) -> None:
    """weights False: the weights are already in the folder (DCP's shards, `sharded.py`), and only the
    model's config.json is written beside them."""
    if weights:
        save_hf(model, folder, dtype=torch.float32, progress=False)
    else:
        write_config(model.cfg, folder, torch.float32)
    tokenizer.save(folder)
    torch.save(state, folder / "train_state.pt.tmp")
    os.replace(folder / "train_state.pt.tmp", folder / "train_state.pt")
    (folder.parent / "latest.tmp").write_text(folder.name + "\n")
    os.replace(folder.parent / "latest.tmp", folder.parent / "latest")


def complete(folder: Path) -> bool:
    return (folder / "train_state.pt").is_file()


def latest_checkpoint(out_dir: str | Path, note=lambda text: None) -> Path | None:
    """The complete checkpoint `checkpoints/latest` names; if that pointer is missing, empty or names
    an incomplete folder, the newest complete checkpoint (and `note` says so); None if there is none."""
    folder = Path(out_dir) / "checkpoints"
    try:
        name = (folder / "latest").read_text().strip()
    except OSError:
        name = None
    if name and complete(folder / name):
        return folder / name
    found = sorted(p for p in folder.glob("step_*") if complete(p))
    if found:
        problem = (f"names {name!r}, which is not a complete checkpoint" if name else
                   "is empty" if name == "" else "is missing")
        note(f"{folder / 'latest'} {problem}; using the newest complete checkpoint, {found[-1].name}")
    return found[-1] if found else None


def restore(state: dict | None, opt, loader) -> int:
    """Optimizer, loader and RNG as a checkpoint's train_state left them; the step to continue from
    (0 without one)."""
    if not state:
        return 0
    if state["optimizer"] is not None:  # None: a sharded checkpoint, whose state `sharded.load` read
        opt.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    torch.set_rng_state(state["rng"])
    return state["step"]
