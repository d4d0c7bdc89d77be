"""TrainConfig: one flat dataclass for a pretraining run, named presets, and argparse ⇄ dataclass.

Presets are derived from `demo` with `dataclasses.replace`; every field is also a `--flag` of
`openk2 train` / `python -m openk2.train`, so a run is `preset + overrides`, and the resolved config
is what checkpoints and logs record.
"""

import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass

from openk2.config import ModelConfig


@dataclass(frozen=True)
class TrainConfig:
    model: str = "k2-mini"  # a model preset or a config.json
    data: str | None = None  # None: the Python standard library's source; else .txt/.jsonl folder or HF dataset
    tokenizer: str | None = None  # a K2-format tokenizer folder; None: train one on the corpus
    out_dir: str = "runs/k2-mini"
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    steps: int = 200
    minutes: float = 0.0  # 0: off; else the steps that fit in this many minutes, at most --steps (train/budget.py)
    optimizer: str = "muonclip"  # muonclip | adamw
    lr: float = 4e-3  # peak
    final_lr_frac: float = 0.1  # WSD decays to lr · final_lr_frac (K2: 2e-4 -> 2e-5)
    warmup_steps: int = 20
    decay_frac: float = 0.3  # the last 30% of the steps decay (cosine)
    weight_decay: float = 0.1
    qk_clip_tau: float = 100.0  # 0: QK-Clip off
    bias_update_speed: float = 1e-2  # balancing step γ (DeepSeek-V3 1e-3 over ~10⁵ steps; short runs need more); 0: off
    seq_aux_weight: float = 0.0  # sequence-wise balance loss weight α (DeepSeek-V3 used 1e-4); 0: off
    grad_clip: float = 1.0  # 0: off
    autocast: str = "bfloat16"  # bfloat16 | none
    val_fraction: float = 0.01
    eval_every: int = 40
    eval_batches: int = 4
    log_every: int = 5
    ckpt_every: int = 100
    seed: int = 0
    peak_tflops: float = 2.0  # for MFU: the peak of all processes together (this 2-core CPU's bf16 AMX)
    threads: int = 0  # 0: torch's default
    ep: int = 1  # expert parallelism under torchrun: experts sharded over groups of this many processes
    fsdp: bool = False  # under torchrun: FSDP2 shards the dense weights and their optimizer state over all processes
    checkpoint_format: str = "auto"  # hf: rank 0 writes a HF folder; dcp: each rank its shards; auto: dcp with --fsdp
    resume: bool = False

    @property
    def sharded_checkpoints(self) -> bool:
        return self.checkpoint_format == "dcp" or (self.checkpoint_format == "auto" and self.fsdp)

    def __post_init__(self):
        if self.optimizer not in ("muonclip", "adamw"):
            raise ValueError(f"optimizer must be muonclip or adamw, not {self.optimizer!r}")
        if self.checkpoint_format not in ("auto", "hf", "dcp"):
            raise ValueError(f"checkpoint_format must be auto, hf or dcp, not {self.checkpoint_format!r}")
        if self.fsdp and self.checkpoint_format == "hf":
            raise ValueError("--fsdp writes sharded checkpoints (--checkpoint-format dcp); `openk2 convert "
                             "CHECKPOINT OUT --quantize fp32` makes a Hugging Face folder of one")
        if self.autocast not in ("bfloat16", "none"):
            raise ValueError(f"autocast must be bfloat16 or none, not {self.autocast!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "log_every", "ckpt_every",
                     "eval_batches", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "grad_clip", "threads", "qk_clip_tau", "bias_update_speed", "seq_aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.minutes < 0:
            raise ValueError(f"minutes must be >= 0 (0: off), got {self.minutes}")
        if not (0 <= self.decay_frac <= 1 and 0 < self.val_fraction < 1 and self.peak_tflops > 0 and self.lr > 0):
            raise ValueError("need 0 <= decay_frac <= 1, 0 < val_fraction < 1, peak_tflops > 0 and lr > 0")
        if self.warmup_steps + self.decay_steps > self.steps - 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) + decay steps ({self.decay_steps}) do not fit "
                             f"in {self.steps} steps")

    @property
    def decay_steps(self) -> int:
        return self.decay_steps_of(self.steps)

    def decay_steps_of(self, steps: int) -> int:
        """The decay's length in a run of `steps` steps (the last `decay_frac` of them, one at least)."""
        return max(1, int(steps * self.decay_frac)) if self.decay_frac else 0

    # fields that shape the training trajectory: a resumed run must keep them
    TRAJECTORY = ("model", "steps", "minutes", "lr", "final_lr_frac", "warmup_steps", "decay_frac", "optimizer",
                  "seq_len", "weight_decay", "qk_clip_tau", "bias_update_speed", "seq_aux_weight", "seed", "data")

    def model_config(self) -> ModelConfig:
        from openk2.config import resolve_config
        return resolve_config(self.model)


TRAIN_PRESETS: dict[str, TrainConfig] = {"demo": TrainConfig()}
TRAIN_PRESETS["tiny"] = dataclasses.replace(  # tests: seconds, not minutes
    TRAIN_PRESETS["demo"], model="k2-tiny", out_dir="runs/tiny", seq_len=32, batch_size=4, steps=6,
    warmup_steps=2, eval_every=3, eval_batches=1, log_every=1, ckpt_every=3, lr=3e-3)


def field_notes(cls) -> dict[str, str]:
    """Each field's trailing comment in the dataclass source (and its bases'): the flags' help."""
    notes = {}
    for c in reversed(cls.__mro__[:-1]):
        notes |= dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.+)$", inspect.getsource(c), re.M))
    return notes


def add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), notes: dict | None = None,
                     defaults: dict | None = None):
    """One `--field value` flag per field of the dataclass `cls` (default None: not given), its help the
    field's comment (or `notes`), with its value from `defaults` when given."""
    notes = {**field_notes(cls), **(notes or {})}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, text = "--" + f.name.replace("_", "-"), notes.get(f.name, "")
        if defaults is not None:
            text += f" (default: {defaults.get(f.name, f.default)})"
        text = text.strip().replace("%", "%%") or None
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type, f.type if f.type in (int, float) else str)
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=text)


def config_from(p: argparse.ArgumentParser, base, args: dict):
    """`base` with the flags that were given; a bad value is a usage error."""
    try:
        return dataclasses.replace(base, **{k: v for k, v in args.items() if v is not None})
    except ValueError as e:
        p.error(str(e))


def parse_args(argv=None, prog: str = "openk2 train") -> TrainConfig:
    """`--preset NAME` then one `--field value` per TrainConfig field."""
    p = argparse.ArgumentParser(prog=prog, description="Pretrain a K2 with MuonClip.")
    p.add_argument("--preset", default="demo", choices=sorted(TRAIN_PRESETS))
    add_config_flags(p, TrainConfig)
    args = vars(p.parse_args(argv))
    return config_from(p, TRAIN_PRESETS[args.pop("preset")], args)
