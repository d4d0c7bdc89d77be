"""Sharded training checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes the tensors
it holds, once across replicas, and a run reads them back at any number of processes.

A checkpoint folder written this way (`openk2 train --checkpoint-format dcp`) holds `dcp/` (DCP's
files: the model's weights and the optimizer's state, keyed by name), the model's `config.json`, the
tokenizer and `train_state.pt` (step, loader, RNG, config; written last by rank 0, as for the Hugging
Face layout, so `state.complete` still tells a finished folder). Keys:

    model.<name>          a `model.state_dict()` entry (parameters and persistent buffers)
    optim.<name>.<key>    the optimizer's state of parameter <name>: tensors of its shape, or numbers

A rank passes each tensor through `view(name, tensor)`, which says what part of the whole it is: a
tensor as it is (every rank holds all of it; DCP writes one copy), or a `DTensor` over the rank's
device mesh (expert parallelism: this rank's rows of a stack of experts). Reading at another world
size asks for other parts of the same whole, which DCP cuts from the saved shards; a single process
without torch.distributed reads the whole (`load_model`: what `load_hf` does for such a folder, so
`generate`, `serve` and `convert` take these checkpoints as they are).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

MODEL, OPTIM = "model.", "optim."
SHARDS = "dcp"  # the subfolder of a checkpoint that holds DCP's files


def is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / SHARDS / ".metadata").is_file()


def _alone() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _call(fn, sd: dict, path: Path) -> None:
    """dcp.save / dcp.load; in a single process without torch.distributed, as such (DCP warns of it
    every call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        fn(sd, checkpoint_id=str(path), no_dist=_alone())


def whole(name: str, t: torch.Tensor) -> torch.Tensor:
    """The `view` of a tensor every rank holds whole."""
    return t


def _model_entries(model, view=whole, saved: dict | None = None, folder: Path | None = None) -> dict:
    """{model.<name>: tensor through `view`} of `model.state_dict()` (sharing storage with the model);
    with `saved` (a checkpoint's keys), a clear error for any the checkpoint lacks."""
    sd = {MODEL + n: view(n, t) for n, t in model.state_dict().items()}
    missing = [k for k in sd if saved is not None and k not in saved]
    if missing:
        raise KeyError(f"{folder}: checkpoint lacks {', '.join(missing[:5])}")
    return sd


def training_state(model, opt, view=whole) -> dict:
    """The flat, name-keyed state dict of a model and its optimizer (keys above), each tensor through
    `view`; tensors share storage with the live ones, so a load writes into the model and optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = _model_entries(model, view)
    for p, entry in opt.state.items():
        name = names[id(p)]
        for key, v in entry.items():
            sd[f"{OPTIM}{name}.{key}"] = view(name, v) if torch.is_tensor(v) and v.shape == p.shape else v
    return sd


def save(folder: str | Path, model, opt, view=whole) -> None:
    """Collective under torch.distributed: every rank writes its part into `folder/dcp`."""
    import torch.distributed.checkpoint as dcp
    _call(dcp.save, training_state(model, opt, view), Path(folder) / SHARDS)


def _saved_keys(folder: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(folder / SHARDS)).read_metadata().state_dict_metadata


def load(folder: str | Path, model, opt, view=whole) -> None:
    """Fill `model` and `opt` (a fresh optimizer over the model's parameters) from a checkpoint written
    at any world size: the same names, each rank reading the parts `view` gives it. Collective under
    torch.distributed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    folder = Path(folder)
    params = dict(model.named_parameters())
    saved = _saved_keys(folder)
    sd = _model_entries(model, view, saved, folder)
    entries: dict[str, tuple] = {}  # optimizer key -> (parameter, state key)
    for key, meta in saved.items():
        if not key.startswith(OPTIM):
            continue
        name, field = key[len(OPTIM):].rsplit(".", 1)
        if name not in params:
            raise KeyError(f"{folder}: optimizer state for {name}, which this model does not have")
        p = params[name]
        sd[key] = view(name, torch.empty_like(p)) if isinstance(meta, TensorStorageMetadata) else 0
        entries[key] = (p, field)
    _call(dcp.load, sd, folder / SHARDS)
    for key, (p, field) in entries.items():
        v = sd[key]  # kept a DTensor where the parameter is one (FSDP2), else the part this rank holds
        opt.state[p][field] = v if hasattr(p, "to_local") else getattr(v, "to_local", lambda v=v: v)()


def load_model(folder: str | Path, dtype: torch.dtype | None = None, device="cpu", config=None):
    """The whole model of a sharded checkpoint, in one process (`load_hf` calls this for such folders)."""
    import torch.distributed.checkpoint as dcp

    from openk2.config import ModelConfig
    from openk2.model.transformer import Transformer, cast
    folder = Path(folder)
    cfg = config or ModelConfig.from_json(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    sd = _model_entries(model, saved=_saved_keys(folder), folder=folder)
    _call(dcp.load, sd, folder / SHARDS)
    model.init_buffers()
    return cast(model, dtype or getattr(torch, cfg.torch_dtype or "float32", torch.float32))
