"""Which parameters Muon orthogonalises, and as which matrices; AdamW takes the rest (Moonlight's rule,
extended to stacked MoE experts). `openk2.optim.muon.Muon` steps the groups made here."""

from torch import nn


def muon_param_groups(model: nn.Module, *, router_in_muon: bool = False) -> list[dict]:
    """Split a Transformer's parameters into Muon and AdamW groups (Moonlight's rule, extended to MoE).

    - Muon: every matrix of attention, dense MLPs and shared experts, as stored (`kv_b_proj` is one
      matrix, as in HF). Routed experts are stacked but orthogonalised one matrix each, as HF's separate
      tensors: `experts.gate_up_proj` [E, 2F, D] as 2E matrices [F, D] (each expert's gate rows, then
      its up rows), `experts.down_proj` [E, D, F] as E matrices [D, F]. The group key `matrix` gives
      that shape (None: the parameter is the matrix).
    - AdamW: `embed_tokens`, `lm_head`, every parameter below 2-D (norms, biases) and, by default, the
      router `mlp.gate.weight` [E, D]: what K2 did is *Unverified* (K2-SPEC §7.1), AdamW is the
      conservative choice (each expert's row moves by its own gradient statistics, as a row of the
      embedding does), and `router_in_muon=True` gives the rule of Moonlight's toy_train.py (2-D ->
      Muon).
    - Neither: `e_score_correction_bias` is a buffer, not a parameter; no gradient trains it (the
      balancing rule updates it elsewhere), so no optimizer sees it.
    """
    muon_2d, stacked, adamw = [], {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name or "lm_head" in name or (
                name.endswith("mlp.gate.weight") and not router_in_muon):
            adamw.append(p)
        elif p.ndim == 2:
            muon_2d.append(p)
        elif name.endswith("experts.gate_up_proj"):
            stacked.setdefault((p.shape[1] // 2, p.shape[2]), []).append(p)
        elif name.endswith("experts.down_proj"):
            stacked.setdefault(tuple(p.shape[1:]), []).append(p)
        else:
            raise ValueError(f"{name} {tuple(p.shape)}: no rule says which matrices to orthogonalise")
    groups = [dict(params=muon_2d, algo="muon", matrix=None)]
    groups += [dict(params=ps, algo="muon", matrix=shape) for shape, ps in stacked.items()]
    groups.append(dict(params=adamw, algo="adamw"))
    return [g for g in groups if g["params"]]
