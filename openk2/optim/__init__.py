"""MuonClip (K2-SPEC §7): Muon + AdamW (`muon.py`), QK-Clip after each step (`qk_clip.py`), and the
WSD learning rate (`schedule.py`). The math is in pure functions; `Muon` only holds state.

    opt = Muon(muon_param_groups(model), weight_decay=0.1)
    model.record_max_logits(True)                      # S_max per head, from each training forward
    for step, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = wsd_lr(step, **K2_WSD)
        lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        apply_qk_clip(model, reduce_max_logits(model.max_logits()), tau=100.0)
"""

from openk2.optim.groups import muon_param_groups
from openk2.optim.muon import Muon, adamw_update, match_adamw_rms, momentum_step, muon_update, newton_schulz
from openk2.optim.qk_clip import apply_qk_clip, clip_mla_heads, qk_clip_factors, reduce_max_logits
from openk2.optim.schedule import K2_WSD, wsd_lr

__all__ = ["Muon", "muon_param_groups", "newton_schulz", "momentum_step", "match_adamw_rms", "muon_update",
           "adamw_update", "apply_qk_clip", "clip_mla_heads", "qk_clip_factors", "reduce_max_logits",
           "wsd_lr", "K2_WSD"]
