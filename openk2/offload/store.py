"""Routed experts read from a checkpoint folder on demand (the bounded cache they go into: cache.py).

`ExpertStore` reads one expert (gate, up, down) of one layer straight from the folder's safetensors
files with `os.preadv` at the offsets their headers give: no mmap, so pages read are never counted in
the process's resident memory, and a bf16 expert lands in its cache slot with no copy. FP8 block and
INT4 group experts are dequantised on the way in by the checkpoint reader's own code, so the cache
holds exactly the tensors `load_hf` would have put in the model; an int4 cache takes INT4 experts'
codes and scales as they are stored (`read_int4_part`).

    L layers  E experts per layer  F expert hidden  D hidden
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

from openk2.checkpoint.hf import _quant_sizes, _read_weight, _Shards
from openk2.config import ModelConfig
from openk2.info import INT4_GROUP
from openk2.quant.int4_decode import halves_from_packed

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
           "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class SafetensorsFile:
    """One safetensors file, read tensor by tensor with pread: an 8-byte little-endian header length,
    a JSON header of {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            n = int.from_bytes(os.pread(self.fd, 8, 0), "little")
            header = json.loads(os.pread(self.fd, n, 8))
        except (ValueError, OSError) as e:
            os.close(self.fd)
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.base, self.entries = 8 + n, header

    def empty(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])

    def read_into(self, name: str, out: torch.Tensor) -> int:
        """Fill the contiguous CPU tensor `out` with `name`'s bytes; returns the bytes read."""
        begin, end = self.entries[name]["data_offsets"]
        if out.nbytes != end - begin:
            raise ValueError(f"{self.path}: tensor {name} holds {end - begin} bytes, the slot {out.nbytes}")
        view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self.base + begin + done)
            if got == 0:
                raise OSError(f"{self.path}: tensor {name} cut short ({done} of {len(view)} bytes on disk)")
            done += got
        return done

    def read(self, name: str) -> torch.Tensor:
        out = self.empty(name)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        os.close(self.fd)


class _Reader(_Shards):
    """The checkpoint reader's name -> tensor map over pread files instead of mmapped ones."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.files: dict[str, SafetensorsFile] = {}
        self.lock = threading.Lock()  # reader threads may open a shard at once

    def file(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise KeyError(f"tensor {name} is not in the checkpoint {self.folder}")
        file = self.where[name]
        with self.lock:
            if file not in self.files:
                self.files[file] = SafetensorsFile(self.folder / file)
            return self.files[file]

    def get(self, name: str) -> torch.Tensor:
        return self.file(name).read(name)

    def nbytes(self, name: str) -> int:
        begin, end = self.file(name).entries[name]["data_offsets"]
        return end - begin


class ExpertStore:
    """Layer i's expert e from a HF folder, in any format `load_hf` reads (bf16/fp32, FP8, INT4)."""

    def __init__(self, folder: str | Path, cfg: ModelConfig):
        self.folder, self.cfg = Path(folder), cfg
        self.reader = _Reader(self.folder)
        self.block, self.group = _quant_sizes(cfg.extra.get("quantization_config"))
        moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        self.names = {(i, e, proj): self._stored(i, e, proj) for i in moe_layers
                      for e in range(cfg.n_routed_experts) for proj in ("gate_proj", "up_proj", "down_proj")}
        for name in self.names.values():  # every shard opened now: a missing or unreadable one fails here
            self.reader.file(name)

    def _stored(self, layer: int, expert: int, proj: str) -> str:
        """The name a weight is stored under (plain, FP8 beside its scale, or INT4 packed)."""
        base = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
        for name in (base, base + "_packed"):
            if name in self.reader.where:
                return name
        raise KeyError(f"{self.folder}: checkpoint lacks {base}")

    def read_into(self, layer: int, expert: int, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> int:
        """Write the expert's weights into the two slots (views of the cache's tensors); returns the
        bytes read."""
        return sum(self.read_part(layer, expert, proj, dest) for proj, dest in self.parts(gate_up_2FD, down_DF))

    @staticmethod
    def parts(gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(stored weight, the view of the slots it fills): gate rows first, then up; down. Any tensors
        laid out by those rows (an int4 cache's codes or scales too)."""
        F_ = gate_up_2FD.shape[0] // 2
        return [("gate_proj", gate_up_2FD[:F_]), ("up_proj", gate_up_2FD[F_:]), ("down_proj", down_DF)]

    def read_part(self, layer: int, expert: int, proj: str, dest: torch.Tensor) -> int:
        """One stored weight into `dest`; returns the bytes read. Threads may read different parts at once."""
        name = self.names[layer, expert, proj]
        file = self.reader.file(name)
        entry = file.entries[name]
        stored = _DTYPES[entry["dtype"]], list(entry["shape"])
        if dest.device.type == "cpu" and stored == (dest.dtype, list(dest.shape)):
            return file.read_into(name, dest)  # straight into the slot
        base = name.removesuffix("_packed")
        nbytes = sum(self.reader.nbytes(n) for n in (name, name + "_scale_inv", base + "_scale", base + "_shape")
                     if n in self.reader.where)
        _, t = _read_weight(self.reader, name, self.block, self.group)
        if tuple(t.shape) != tuple(dest.shape):
            raise ValueError(f"{file.path}: tensor {name} has shape {tuple(t.shape)}, "
                             f"the config expects {tuple(dest.shape)}")
        with torch.inference_mode(dest.is_inference()):  # a reader thread has no inference mode of its own
            dest.copy_(t)
        return nbytes

    def read_int4_part(self, layer: int, expert: int, proj: str, codes_dest: torch.Tensor,
                       scale_dest: torch.Tensor) -> int | None:
        """An INT4 weight stored with the int4 cache's group, straight into that cache's slot: the codes
        repacked into the decode layout, the scales copied, so a bf16 or fp32 cache holds the
        checkpoint's own values (dequantising to bf16 and quantising again changes ~1 scale in 10). Returns the bytes
        read; None for a weight stored in any other format (the caller quantises it)."""
        name = self.names[layer, expert, proj]
        if not name.endswith("_packed") or self.group != INT4_GROUP:
            return None
        base = name.removesuffix("_packed")
        packed, scale, shape = (self.reader.get(base + k) for k in ("_packed", "_scale", "_shape"))
        rows, cols = codes_dest.shape[0], 2 * codes_dest.shape[1]
        if (shape.tolist(), list(packed.shape), list(scale.shape)) != ([rows, cols], [rows, cols // 8],
                                                                     list(scale_dest.shape)):
            raise ValueError(f"{self.reader.file(name).path}: tensor {name} holds a {shape.tolist()} weight "
                             f"(packed {list(packed.shape)}, scale {list(scale.shape)}); the config expects "
                             f"{[rows, cols]} (scale {list(scale_dest.shape)})")
        with torch.inference_mode(codes_dest.is_inference()):  # a reader thread has no inference mode of its own
            codes_dest.copy_(halves_from_packed(packed))
            scale_dest.copy_(scale)
        return sum(self.reader.nbytes(base + k) for k in ("_packed", "_scale", "_shape"))

    def close(self) -> None:
        for f in self.reader.files.values():
            f.close()
        self.reader.files.clear()
