"""int4 modules for the decode step: the decode layout (`pack_halves`: uint8 [..., O, I/2]; within each
group of 32 inputs byte j holds code j in its low nibble and code j + 16 in its high one, so both halves
unpack with one mask or shift over contiguous bytes; scale [..., O, I/32]), `Int4Experts` (routed
experts stacked in that layout, 0.5 bytes per weight), `Int4Linear` (any other linear, one matrix in
it), and their kernel.

The kernel: `openk2::int4_pairs` (openk2/kernels/int4_cpu.cpp), built on first use with openk2's
other CPU kernels (`openk2.kernels.load`) and offered to the decode step through
`openk2.model.linear.PAIRS_KERNELS` for uint8 (int4) codes. Without a compiler (or with
OPENK2_CPU_KERNELS=0) the step fuses its own loop over the same codes (`openk2.model.linear.matvec`),
the reference the kernel is tested against.
"""


import torch
import torch.nn.functional as F
from torch import nn

from openk2.kernels import cpu_op, load_for
from openk2.model import linear
from openk2.model.linear import few_rows
from openk2.model.moe import routed_reference, swiglu_by_kernel
from openk2.quant.int4 import INT4_GROUP, unpack_int4

def pack_halves(codes_OI: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Unsigned codes 0..15 [..., O, I] -> the decode layout uint8 [..., O, I/2] (see the module doc)."""
    g = codes_OI.to(torch.uint8).unflatten(-1, (-1, 2, group // 2))
    return (g[..., 0, :] | (g[..., 1, :] << 4)).flatten(-2)


def halves_from_packed(packed_OP: torch.Tensor) -> torch.Tensor:
    """The checkpoint layout's codes (int32 [O, I/8], int4.py) in the decode layout, uint8 [O, I/2]."""
    return pack_halves(unpack_int4(packed_OP))


def quantize_halves(w_OI: torch.Tensor, group: int = INT4_GROUP, kernel: bool = True):
    """`quantize_int4` straight into the decode layout: (codes uint8 [O, I/2], scale [O, I/group]), equal
    to `pack_halves(unpack_int4(packed))` and its scale: the same arithmetic without the int32 packing and
    its undoing, by the CPU kernel `openk2::quantize_halves` in one pass where it is built (what an int4
    expert cache spends on each miss), else (or `kernel=False`: the reference) in torch."""
    if w_OI.shape[1] % group:
        raise ValueError(f"int4: in features ({w_OI.shape[1]}) must be a multiple of the group ({group})")
    op = cpu_op("quantize_halves") if kernel and w_OI.device.type == "cpu" else None
    if op is not None:
        return tuple(op(w_OI, group))
    g_OGS = w_OI.float().unflatten(1, (-1, group))
    scale_OG = (g_OGS.abs().amax(-1) / 7).clamp_(min=1e-12).to(w_OI.dtype)
    q = torch.round(g_OGS / scale_OG.float()[..., None]).clamp_(-8, 7).add_(8).to(torch.uint8)  # (g may be w)
    return (q[..., :group // 2] | (q[..., group // 2:] << 4)).flatten(1), scale_OG


def unpack_halves(packed_OH: torch.Tensor, scale_OG: torch.Tensor, dtype) -> torch.Tensor:
    """The decode layout -> W = (code − 8) · scale, [..., O, I], in fp32 rounded once to `dtype`."""
    g = packed_OH.unflatten(-1, (scale_OG.shape[-1], -1))
    q = torch.stack((g & 15, g >> 4), -2).float() - 8  # [..., O, G, 2, group/2]
    return (q * scale_OG.float()[..., None, None]).flatten(-3).to(dtype)


class Int4Experts(nn.Module):
    """Drop-in for `openk2.model.moe.Experts` (gate_up [E, 2F, D], down [E, D, F]) as group-wise int4
    in the decode layout, stacked; not persistent (checkpoints hold K2-Thinking's layout, see
    `openk2.checkpoint`). Its face (`decode_weights`) is the codes and group scales, which the compiled
    decode step reads per chosen expert; eagerly, each used expert is dequantised to the activation
    dtype once per call and multiplied (prefill chunks; with AMX and bf16 rows, dequantised block by
    block inside one kernel call), or, for few rows an expert, all rows go through the kernel at once
    (eager decode steps)."""

    def __init__(self, gate_up_q, gate_up_scale, down_q, down_scale):
        super().__init__()
        load_for(gate_up_q.device)  # the decode step's kernel for these codes, where it builds
        for name, t in zip(("gate_up_q", "gate_up_scale", "down_q", "down_scale"),
                           (gate_up_q, gate_up_scale, down_q, down_scale)):
            self.register_buffer(name, t, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_weights(cls, gate_up_EOI: torch.Tensor, down_EOI: torch.Tensor, group: int = INT4_GROUP):
        stacked = []
        for w_EOI in (gate_up_EOI, down_EOI):
            codes, scale = zip(*(quantize_halves(w, group) for w in w_EOI))
            stacked += [torch.stack(codes), torch.stack(scale)]
        return cls(*stacked)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts, group: int = INT4_GROUP):
        """`experts` (an `Experts`) as int4. Experts loaded from an INT4 checkpoint keep its own codes and
        scales (`stored_int4`, set by the loader), as long as the weights are still exactly what those
        dequantise to: quantising the dequantised weights again would change some scales. Otherwise
        (trained since, or never INT4), the weights are quantised."""
        stored = getattr(experts, "stored_int4", None)
        if stored is not None and group == INT4_GROUP:
            w = experts.gate_up_proj
            q = cls(*(t.to(w.device) for t in stored()))
            if all(torch.equal(unpack_halves(c, s, w.dtype), w_) for c, s, w_ in
                   ((q.gate_up_q, q.gate_up_scale, w), (q.down_q, q.down_scale, experts.down_proj))):
                return q
        return cls.from_weights(experts.gate_up_proj, experts.down_proj, group)

    @property
    def decode_weights(self) -> tuple:
        return self.gate_up_q, self.gate_up_scale, self.down_q, self.down_scale

    def weights(self, e: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's gate_up [2F, D] and down [D, F], dequantised to `dtype`."""
        return (unpack_halves(self.gate_up_q[e], self.gate_up_scale[e], dtype),
                unpack_halves(self.down_q[e], self.down_scale[e], dtype))

    def forward(self, x_MD, counts_E, w_M, grouped: bool | None = None):
        """Rows of x_MD sorted by expert (counts_E[e] rows each), each scaled by its weight w_M."""
        if grouped:
            raise NotImplementedError("quantized experts have no grouped kernel; pass grouped=None/False")
        # few rows an expert: the int4 kernel; more: the dequantised weights, in one call with AMX
        y_MD = swiglu_by_kernel(x_MD, counts_E, w_M, *self.decode_weights)
        if y_MD is not None:
            return y_MD
        out = []
        for e, x in enumerate(x_MD.split(counts_E.tolist())):
            if len(x):
                w_gate_up, w_down = self.weights(e, x.dtype)
                gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
                out.append(F.linear(F.silu(gate).mul_(up), w_down))
        return torch.cat(out).mul_(w_M[:, None])

    def forward_reference(self, x_ND, topk_idx_NK, topk_w_NK):
        """The routing reference: each expert's tokens through its dequantised SwiGLU, weighted, summed."""
        def swiglu(e, x):
            w_gate_up, w_down = self.weights(e, x.dtype)
            gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w_down)
        return routed_reference(x_ND, topk_idx_NK, topk_w_NK, self.gate_up_q.shape[0], swiglu)


KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes openk2::int4_pairs reads


class Int4Linear(nn.Module):
    """nn.Linear(I, O, bias=False) as group-wise symmetric int4 in the decode layout: codes uint8 [O, I/2]
    and scale [O, G], not persistent (no file format: checkpoints hold K2-Thinking's layout). Its face
    (`decode_weights`) is the codes and scales, which the compiled decode step reads as a stack of one;
    eagerly, a few rows go through the kernel and more are multiplied by the weight dequantised once
    per call. Inference only: buffers, fixed at construction."""

    def __init__(self, codes_OH: torch.Tensor, scale_OG: torch.Tensor):
        super().__init__()
        load_for(codes_OH.device)
        self.out_features, self.in_features = codes_OH.shape[0], codes_OH.shape[1] * 2
        if self.in_features // scale_OG.shape[1] not in KERNEL_GROUPS:  # the kernel's, which the step calls
            raise ValueError(f"int4 linears: groups of {', '.join(map(str, KERNEL_GROUPS))} inputs, not "
                             f"{self.in_features // scale_OG.shape[1]}")
        self.register_buffer("codes", codes_OH, persistent=False)
        self.register_buffer("scale", scale_OG, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w_OI: torch.Tensor, group: int = INT4_GROUP) -> "Int4Linear":
        return cls(*quantize_halves(w_OI, group))

    @property
    def decode_weights(self) -> tuple:
        return self.codes, self.scale

    def forward(self, x):
        x_NI = x.reshape(-1, self.in_features)
        if linear.pairs_kernel(self.codes) is not None and few_rows(x_NI.shape[0], 1, self.codes, x_NI.dtype):
            y = linear.one_matrix(x_NI, self.codes, self.scale).to(x.dtype)
        else:
            y = F.linear(x_NI, unpack_halves(self.codes, self.scale, x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group {self.in_features // self.scale.shape[1]}")
