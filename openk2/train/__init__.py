"""Pretraining: `TrainConfig` (+ presets, CLI flags) and `train(cfg)`; `python -m openk2.train` for torchrun."""

from openk2.train.config import TRAIN_PRESETS, TrainConfig, parse_args
from openk2.checkpoint import latest_checkpoint
from openk2.train.loop import train

__all__ = ["TrainConfig", "TRAIN_PRESETS", "parse_args", "train", "latest_checkpoint"]
