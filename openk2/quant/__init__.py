"""Weight-only quantization as a transform: `quantize_model(model, "int8" | "int4")` swaps modules in
place; the model code never knows. The formats are defined here once (int8.py, int4.py, fp8.py), and
`openk2.checkpoint` reads and writes K2's int4 and FP8 releases through them (`convert`).

What is quantized (and why the rest is not):
- routed experts (98.9% of K2's parameters) -> `QuantizedExperts` (int8) or `Int4Experts`, always;
- int8: also every other nn.Linear of attention, the dense MLP and the shared experts (per-channel
  int8 is near-lossless); int4 defaults to K2-Thinking's recipe, routed experts only (the only int4
  Moonshot trained for, K2-SPEC §4.3), `linears=True` adds the other linears in int4 too;
- never: the router `mlp.gate` (fp32, tiny, decides the experts), embed_tokens (a lookup), lm_head
  (0.1% of K2, where errors land directly on the logits; the engine also reads `lm_head.weight` for
  the cache dtype), kv_b_proj (its weight is read as a tensor by the absorbed MLA path; 0.05%).
References: each kernel has a dequantise-then-matmul twin in its file; the whole transform has
`fake_quantize`, which rounds the same weights to the same grid but keeps them in the float model, so
`quantize_model(m)(x)` must match `fake_quantize(m)(x)` (tests/test_quant.py).

    M (token, expert) pairs sorted by expert  N tokens  D hidden  F expert hidden  E experts  K per token
"""

import torch
import torch.nn.functional as F
from torch import nn

from openk2.model.moe import Experts, routed_reference, swiglu_by_kernel
from openk2.quant.int4 import dequantize_int4, quantize_int4
from openk2.quant.int4_decode import Int4Experts, Int4Linear, unpack_halves
from openk2.quant.int8 import Int8Linear, dequantize_int8, quantize_int8

LINEARS = {"int8": Int8Linear, "int4": Int4Linear}
ROUND_TRIP = {"int8": lambda w: dequantize_int8(*quantize_int8(w), w.dtype),
              "int4": lambda w: dequantize_int4(*quantize_int4(w), w.dtype)}
SKIP = ("lm_head", "kv_b_proj")  # module names left in the model dtype (see above)


class QuantizedExperts(nn.Module):
    """Drop-in for `Experts`: per expert, gate+up [2F, D] (gate rows first) and down [D, F] quantized
    linears: the int8 kernel for the rows of all used experts where it serves them (`experts_kernel`),
    else one matmul pair per *used* expert, as Experts' CPU path. int4 experts are `Int4Experts`
    (int4_decode.py), stacked in the layout the decode step reads.

    int8 experts also keep their codes stacked (gate_up [E, 2F, D] int8 and scale [E, 2F], down
    [E, D, F] and [E, D]; not persistent), and each expert's Int8Linear holds views into them, so the
    compiled decode step can index experts by tensor at no extra memory: that is their face
    (`decode_weights`, see openk2.model.linear); experts built of other linears have none (None)."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], stacked: tuple | None = None):
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)
        for name, t in zip(("gate_up_q", "gate_up_scale", "down_q", "down_scale"), stacked or (None,) * 4):
            self.register_buffer(name, t, persistent=False)

    @property
    def decode_weights(self) -> tuple | None:
        return None if self.gate_up_q is None else (self.gate_up_q, self.gate_up_scale, self.down_q, self.down_scale)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, linear: type) -> "QuantizedExperts":
        if linear is not Int8Linear:
            return cls([linear.from_weight(w) for w in experts.gate_up_proj],
                       [linear.from_weight(w) for w in experts.down_proj])
        stacked = []
        for w_EOI in (experts.gate_up_proj, experts.down_proj):
            q, scale = zip(*(quantize_int8(w) for w in w_EOI))
            stacked += [torch.stack(q), torch.stack(scale)]
        gate_up = [Int8Linear(q, s) for q, s in zip(stacked[0], stacked[1])]  # views: no copies
        return cls(gate_up, [Int8Linear(q, s) for q, s in zip(stacked[2], stacked[3])], tuple(stacked))

    def forward(self, x_MD, counts_E, w_M, grouped: bool | None = None):
        """Rows of x_MD sorted by expert (counts_E[e] rows each), each scaled by its weight w_M."""
        if grouped:
            raise NotImplementedError("quantized experts have no grouped kernel; pass grouped=None/False")
        face = self.decode_weights  # stacked int8 codes: the kernel where it serves, as `Experts`
        y_MD = None if face is None else swiglu_by_kernel(x_MD, counts_E, w_M, *face)
        if y_MD is not None:
            return y_MD
        out, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                gate, up = self.gate_up[e](x_MD[start:start + n]).chunk(2, dim=-1)
                out.append(self.down[e](F.silu(gate).mul_(up)))
                start += n
        return torch.cat(out).mul_(w_M[:, None])

    def forward_reference(self, x_ND, topk_idx_NK, topk_w_NK):
        """The routing reference, as Experts.forward_reference, over the same quantized linears."""
        def swiglu(e, x):
            gate, up = self.gate_up[e](x).chunk(2, dim=-1)
            return self.down[e](F.silu(gate) * up)
        return routed_reference(x_ND, topk_idx_NK, topk_w_NK, len(self.gate_up), swiglu)


def _targets(model: nn.Module, mode: str, linears: bool | None):
    """(parent, name, module) for every module the transform replaces: routed experts, and if
    `linears` (default: int8 yes, int4 no) every other nn.Linear outside SKIP."""
    if mode not in LINEARS:
        raise ValueError(f"quantize mode must be one of {', '.join(LINEARS)}, not {mode!r}")
    linears = mode == "int8" if linears is None else linears
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            linear = linears and type(child) is nn.Linear and name not in SKIP
            if linear and child.bias is not None:
                raise ValueError(f"{parent_name}.{name}: quantized linears have no bias")
            if linear or isinstance(child, Experts) or hasattr(child, "quantize_experts"):
                found.append((parent, name, child))
    return found


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, linears: bool | None = None) -> nn.Module:
    """Swap routed experts (and, if `linears`, the other eligible nn.Linear) for quantized modules, in
    place; returns the model. linears None: True for int8, False for int4 (K2-Thinking's recipe)."""
    for parent, name, child in _targets(model, mode, linears):
        if hasattr(child, "quantize_experts"):  # experts that quantize themselves (offloaded: their cache)
            child.quantize_experts(mode)
        elif isinstance(child, Experts) and mode == "int4":  # an INT4 checkpoint's experts keep its codes
            setattr(parent, name, Int4Experts.from_experts(child))
        elif isinstance(child, Experts):
            setattr(parent, name, QuantizedExperts.from_experts(child, LINEARS[mode]))
        else:
            setattr(parent, name, LINEARS[mode].from_weight(child.weight))
    return model


@torch.no_grad()
def fake_quantize(model: nn.Module, mode: str, linears: bool | None = None) -> nn.Module:
    """The reference of `quantize_model`: the same weights rounded to the same grid (quantize, then
    dequantize to their dtype), left in the float modules; in place, returns the model."""
    for _, _, child in _targets(model, mode, linears):
        if hasattr(child, "quantize_experts"):  # int8 leaves them as they are, as quantize_model does
            if mode == "int4":
                raise TypeError("fake_quantize rounds resident weights; these experts are read from disk")
            continue
        if isinstance(child, Experts) and mode == "int4" and getattr(child, "stored_int4", None):
            q = Int4Experts.from_experts(child)  # the stored codes, or the weights' own if they moved
            child.gate_up_proj.copy_(unpack_halves(q.gate_up_q, q.gate_up_scale, child.gate_up_proj.dtype))
            child.down_proj.copy_(unpack_halves(q.down_q, q.down_scale, child.down_proj.dtype))
        elif isinstance(child, Experts):
            for w in (child.gate_up_proj, child.down_proj):
                w.copy_(torch.stack([ROUND_TRIP[mode](w_e) for w_e in w]))
        else:
            child.weight.copy_(ROUND_TRIP[mode](child.weight))
    return model
