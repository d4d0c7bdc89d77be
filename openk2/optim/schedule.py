"""The warm-up / stable / decay (WSD) learning rate of K2's pre-training, as a function of the step
(K2-SPEC §7.3): linear warm-up from 0, a long constant stretch at the peak, then a cosine decay to a
final rate, held there afterwards. The loop sets `group["lr"]` from it; there is no scheduler object.
"""

import math

# K2: 500 warm-up steps; 2e-4 for 10T tokens, cosine 2e-4 -> 2e-5 over the next 5.5T, at a global
# batch of 67M tokens (16,384 × 4,096 = 67,108,864) per step: 10e12 / 67,108,864 ≈ 149,012 stable
# and 5.5e12 / 67,108,864 ≈ 81,956 decay steps, ≈ 231K in all as the report says.
K2_TOKENS_PER_STEP = 16384 * 4096
K2_WSD = dict(peak=2e-4, warmup=500, stable=round(10e12 / K2_TOKENS_PER_STEP),
              decay=round(5.5e12 / K2_TOKENS_PER_STEP), final=2e-5)


def wsd_lr(step: int, *, peak: float, warmup: int, stable: int, decay: int, final: float) -> float:
    """Learning rate at optimizer step `step` (0-based).

    - step < warmup: peak · step / warmup (0 at step 0);
    - warmup ≤ step < warmup + stable: peak;
    - then final + (peak − final) · (1 + cos(π·t)) / 2 with t = (step − warmup − stable) / decay,
      reaching `final` at step warmup + stable + decay and staying there (decay 0: the peak through
      the stable stretch, `final` from step warmup + stable on).
    """
    if step < warmup:
        return peak * step / warmup
    t = (step - warmup - stable) / decay if decay > 0 else float(step >= warmup + stable)
    t = min(max(t, 0.0), 1.0)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))
