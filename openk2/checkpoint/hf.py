"""Hugging Face checkpoint folders: load and save K2's layout, FP8 block and INT4 group weights.

The one translation table between openk2 and HF lives here, and it is short because the model
already uses HF's module names: only the stacked routed experts (`mlp.experts.gate_up_proj`
[E, 2F, D] with gate rows first, `mlp.experts.down_proj` [E, D, F]) are split into / joined from HF's
per-expert tensors (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`).
Loading goes shard by shard through safetensors' mmap and copies each tensor once into a model
built on `meta`, so a checkpoint is never in memory twice. Quantised weights are dequantised on
the way in: block FP8 (`weight_scale_inv`, 128×128 tiles, K2-SPEC §4.2) and compressed-tensors
INT4 (`weight_packed` / `weight_scale` / `weight_shape`, group 32, K2-SPEC §4.3). The formats
themselves are defined once, in `openk2.quant` (fp8.py, int4.py); here are only their tensor names
and `quantization_config`. `convert` rewrites a folder in another of K2's release formats.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from openk2 import __version__
from openk2.checkpoint import sharded
from openk2.config import ModelConfig
from openk2.model.transformer import Transformer, cast
from openk2.quant.fp8 import FP8_BLOCK, dequantize_fp8, is_fp8, quantize_fp8
from openk2.quant.int4 import INT4_GROUP, dequantize_int4, quantize_int4
from openk2.quant.int4_decode import halves_from_packed

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTED = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")  # any routed-expert tensor, any format
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# --- reading -------------------------------------------------------------------------------------
class _Shards:
    """name -> tensor across the shards of a folder, through `model.safetensors.index.json`."""

    def __init__(self, folder: Path):
        self.folder, self._open = folder, {}
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
            self.where = {name: f.name for f in files for name in self.handle(f.name).keys()}
        for name in sorted(set(self.where.values())):
            if not (folder / name).exists():
                users = [k for k, v in self.where.items() if v == name]
                raise FileNotFoundError(f"missing shard {folder / name} (holds {len(users)} tensors, "
                                        f"e.g. {users[0]})")

    def handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = safe_open(self.folder / file, framework="pt")
            except Exception as e:  # noqa: BLE001 — safetensors' error type has no stable import: one line, named
                raise ValueError(f"{self.folder / file}: not a readable safetensors file ({e})") from None
        return self._open[file]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(f"tensor {name} is not in the checkpoint {self.folder}")
        return self.handle(self.where[name]).get_tensor(name)

    def by_file(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, file in self.where.items():
            out.setdefault(file, []).append(name)
        return out


def _is_companion(name: str) -> bool:
    return name.endswith(("_scale_inv", ".weight_scale", ".weight_shape", "rotary_emb.inv_freq"))


def _quant_sizes(quant: dict | None) -> tuple[int, int]:
    """(FP8 block, INT4 group) from a config.json `quantization_config` (K2's values by default)."""
    quant = quant or {}
    block = (quant.get("weight_block_size") or [FP8_BLOCK])[0]
    groups = (quant.get("config_groups") or {}).values()
    group = next((g.get("weights", {}).get("group_size") for g in groups if g.get("weights")), None)
    return block, group or INT4_GROUP


def _read_weight(shards: _Shards, name: str, block: int, group: int) -> tuple[str, torch.Tensor]:
    """(HF weight name, tensor), dequantising FP8 and INT4 storage."""
    try:
        if name.endswith(".weight_packed"):
            base = name[: -len("_packed")]
            packed, scale, shape = (shards.get(base + k) for k in ("_packed", "_scale", "_shape"))
            return base, dequantize_int4(packed, scale, shape=shape.tolist(), group=group)
        t = shards.get(name)
        if is_fp8(t):
            return name, dequantize_fp8(t, shards.get(name + "_scale_inv"), block)
        return name, t
    except ValueError as e:
        raise ValueError(f"{shards.where[name]}: tensor {name}: {e}") from None


def load_dtype(cfg: ModelConfig, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `load_hf` gives a folder's weights: `dtype`, else the config's, else fp32."""
    return dtype or getattr(torch, cfg.torch_dtype or "float32", torch.float32)


def load_hf(path: str | Path, dtype: torch.dtype | None = None, device="cpu",
            progress: bool = True, config: ModelConfig | None = None, experts=None) -> Transformer:
    """A Transformer from a HF folder (config.json + safetensors; or a sharded training checkpoint,
    `sharded.py`). dtype None: the config's. `config`:
    the folder's with changes that keep every tensor's shape (a longer context, say). `experts(i)`:
    a module to stand in for layer i's routed experts, which are then not read (`openk2.offload`)."""
    folder = Path(path)
    if sharded.is_sharded(folder):  # a training checkpoint in DCP's shards
        if experts:
            raise ValueError(f"{folder} is a sharded training checkpoint; expert offload reads safetensors: "
                             f"write a Hugging Face folder first (openk2 convert {folder} OUT --quantize fp32)")
        return sharded.load_model(folder, dtype, device, config)
    cfg = config or ModelConfig.from_json(folder)
    block, group = _quant_sizes(cfg.extra.get("quantization_config"))
    extra = {k: v for k, v in cfg.extra.items() if k != "quantization_config"}
    cfg = dataclasses.replace(cfg, extra=extra)  # weights are dequantised on load
    dtype = load_dtype(cfg, dtype)
    shards = _Shards(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    for i, layer in enumerate(model.layers if experts else []):
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = experts(i)
    model = cast(model.to_empty(device=device), dtype)  # router stays fp32: the copy must not round it
    targets = dict(_hf_entries(model))  # HF name -> the view of our tensor it fills
    filled: set[str] = set()
    by_file = shards.by_file()
    for file in tqdm(sorted(by_file), desc=f"loading {folder.name}", disable=not progress, unit="shard"):
        for name in by_file[file]:
            layer = _LAYER.match(name)
            if (_is_companion(name) or (layer and int(layer.group(1)) >= cfg.num_hidden_layers)
                    or (experts and _ROUTED.match(name))):
                continue  # scales are read with their weight; MTP layers are not run
            hf_name, t = _read_weight(shards, name, block, group)
            if hf_name not in targets:
                raise KeyError(f"{file}: unexpected tensor {hf_name} for this config")
            dest = targets[hf_name]
            if tuple(t.shape) != tuple(dest.shape):
                raise ValueError(f"{file}: tensor {hf_name} has shape {tuple(t.shape)}, "
                                 f"the config expects {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(t)
            filled.add(hf_name)
    missing = [n for n in targets if n not in filled]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KeyError(f"{folder}: checkpoint lacks {', '.join(missing[:5])}{more}")
    for i, layer in enumerate([] if experts or group != INT4_GROUP else model.layers):
        if f"model.layers.{i}.mlp.experts.0.gate_proj.weight_packed" in shards.where:  # for quantize_model
            layer.mlp.experts.stored_int4 = functools.partial(_stored_int4, folder, i, cfg.n_routed_experts)
    model.init_buffers()
    return model


def _stored_int4(folder: Path, layer: int, n_experts: int) -> tuple[torch.Tensor, ...]:
    """Layer `layer`'s routed experts as an INT4 checkpoint stores them, in `Int4Experts`' layout:
    gate_up codes [E, 2F, D/2] and scales [E, 2F, D/32], down codes and scales."""
    shards = _Shards(folder)

    def stored(e: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        base = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        return halves_from_packed(shards.get(base + "_packed")), shards.get(base + "_scale")

    gate, up, down = ([stored(e, p) for e in range(n_experts)] for p in ("gate_proj", "up_proj", "down_proj"))
    return (torch.stack([torch.cat([g[0], u[0]]) for g, u in zip(gate, up)]),
            torch.stack([torch.cat([g[1], u[1]]) for g, u in zip(gate, up)]),
            torch.stack([d[0] for d in down]), torch.stack([d[1] for d in down]))


# --- writing -------------------------------------------------------------------------------------
def _hf_entries(model: Transformer):
    """(HF name, view of our tensor) for every checkpoint tensor: the one name/layout table.

    Identity for everything but the stacked routed experts: gate_up_proj[e] splits into
    `experts.{e}.gate_proj.weight` (first F rows) and `up_proj` (last F), down_proj[e] is `down_proj`.
    """
    named = dict(model.named_parameters())
    named.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    for name, t in named.items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith("mlp.experts") and leaf == "gate_up_proj":
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2, dim=0)
                yield f"{stem}.{e}.gate_proj.weight", gate
                yield f"{stem}.{e}.up_proj.weight", up
        elif stem.endswith("mlp.experts") and leaf == "down_proj":
            for e in range(t.shape[0]):
                yield f"{stem}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _fp8_target(name: str) -> bool:
    # attention (kv_a_proj_with_mqa included), dense MLP, experts
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and ".layers." in name


def _encode(name: str, t: torch.Tensor, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    t = t.detach().cpu()
    if fmt == "fp8" and _fp8_target(name):
        w, s = quantize_fp8(t)
        return {name: w, name + "_scale_inv": s}
    if fmt == "int4" and _EXPERT.match(name):
        packed, scale = quantize_int4(t, INT4_GROUP, torch.bfloat16)
        base = name[: -len(".weight")]
        return {base + ".weight_packed": packed, base + ".weight_scale": scale,
                base + ".weight_shape": torch.tensor(t.shape, dtype=torch.int32)}
    keep_fp32 = name.endswith("e_score_correction_bias")
    return {name: t.float().contiguous() if keep_fp32 else t.to(dtype).contiguous()}


def _quantization_config(fmt: str) -> dict | None:
    if fmt == "fp8":
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    if fmt == "int4":
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                              "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                          "strategy": "group", "group_size": INT4_GROUP,
                                                          "dynamic": False}}},
                "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                           "re:.*mlp\\.(gate|up|down)_proj.*"]}
    return None


def _stored_bytes(name: str, t: torch.Tensor, fmt: str, dtype: torch.dtype) -> int:
    if fmt == "fp8" and _fp8_target(name):
        return t.numel()
    if fmt == "int4" and _EXPERT.match(name):
        return t.numel() // 2
    return t.numel() * (4 if name.endswith("e_score_correction_bias") else dtype.itemsize)


def write_config(cfg: ModelConfig, folder: Path, dtype: torch.dtype, fmt: str = "bf16") -> None:
    """A folder's config.json: the model's config with the stored dtype and format."""
    folder.mkdir(parents=True, exist_ok=True)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf.pop("quantization_config", None)
    if fmt != "bf16":
        hf["quantization_config"] = _quantization_config(fmt)
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def save_hf(model: Transformer, path: str | Path, dtype: torch.dtype | None = None, fmt: str = "bf16",
            max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> Path:
    """Write config.json + sharded safetensors + index in K2's layout.

    fmt: "bf16" (plain, in `dtype`, default the model's), "fp8" (block FP8 as K2-Instruct),
    "int4" (routed experts as K2-Thinking's compressed-tensors); the unquantised rest of an fp8 or
    int4 folder is bf16 unless `dtype` says otherwise.
    """
    if fmt not in ("bf16", "fp8", "int4"):
        raise ValueError(f"fmt must be bf16, fp8 or int4, not {fmt!r}")
    folder = Path(path)
    dtype = dtype or (model.lm_head.weight.dtype if fmt == "bf16" else torch.bfloat16)
    write_config(model.cfg, folder, dtype, fmt)
    # plan shards by the bytes written, then write each: one shard's tensors in memory at a time
    entries = list(_hf_entries(model))
    plan, size = [[]], 0
    for name, t in entries:
        nbytes = _stored_bytes(name, t, fmt, dtype)
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, t))
        size += nbytes
    meta = {"format": "pt", "openk2_version": __version__, "torch_version": torch.__version__}
    weight_map, total = {}, 0
    for k, part in enumerate(tqdm(plan, desc=f"saving {folder.name}", disable=not progress, unit="shard")):
        file = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, t in part:
            shard.update(_encode(name, t, fmt, dtype))
        save_file(shard, str(folder / file), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


CONVERT_FORMATS = ("int4", "fp8", "bf16", "fp32")


def convert(src: str | Path, dst: str | Path, fmt: str, progress: bool = True) -> Path:
    """Rewrite the HF folder SRC (or a sharded training checkpoint) as DST in a K2 release format,
    copying SRC's other files (tokenizer): int4 as K2-Thinking (routed experts, compressed-tensors),
    fp8 as K2-Instruct, bf16 plain, fp32 plain in full precision (a training checkpoint's export).

    int8 has no format: K2 ships none and `load_hf` reads none; quantizing per channel takes seconds,
    so it is done at load time (`quantize_model(model, "int8")`).
    """
    if fmt not in CONVERT_FORMATS:
        hint = " (int8 is applied at load time: quantize_model(model, 'int8'))" if fmt == "int8" else ""
        raise ValueError(f"convert format must be one of {', '.join(CONVERT_FORMATS)}, not {fmt!r}{hint}")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError(f"convert would overwrite its source {src}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(fmt)  # fp8/int4: the rest bf16 (save_hf)
    out = save_hf(load_hf(src, progress=progress), dst, dtype, "bf16" if fmt == "fp32" else fmt, progress=progress)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (
                "config.json", "model.safetensors.index.json", "train_state.pt"):  # not a training run's state
            shutil.copy2(f, dst / f.name)
    return out
