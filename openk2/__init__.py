"""openk2: the Kimi K2 system in PyTorch — model, checkpoints, training, inference, agents."""

__version__ = "0.1.0"

from openk2.config import PRESETS, ModelConfig, resolve_config  # noqa: E402

__all__ = ["ModelConfig", "PRESETS", "resolve_config", "__version__"]
