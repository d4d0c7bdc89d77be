"""The K2 model, single-device. Imports nothing from openk2 but `config`.

Naming: modules carry Hugging Face's names (`q_a_proj`, `kv_b_proj`, `e_score_correction_bias`), so
state-dict keys are checkpoint keys; where math is written, short local aliases with the legend's
shape suffixes (`wkv_b_HYC`). The one adapter (stacked experts, FP8/INT4 tiles) is `openk2.checkpoint`.
Quantization is a transform from outside (`openk2.quant`); the compiled decode step (`Transformer.decode`)
reads any linear's weights through one face, `linear.decode_weights`, without knowing their format.
"""

from openk2.model.attention import MLA, LatentCache
from openk2.model.moe import MoE
from openk2.model.transformer import Transformer, build_model, count_params, lm_loss

__all__ = ["Transformer", "MLA", "MoE", "LatentCache", "build_model", "count_params", "lm_loss"]
