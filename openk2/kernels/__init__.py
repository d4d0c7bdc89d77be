"""openk2's CPU kernels: the decode step's, offered to it through `openk2.model.linear.PAIRS_KERNELS`
(the chosen experts' matrix-vector products, by the dtype of the weights or codes), training's and Muon's:

- `int4_cpu.cpp`, `openk2::int4_pairs`: int4 experts in the decode layout (openk2/quant/int4_decode.py),
  and `openk2::quantize_halves`, weights into that layout in one pass (`cpu_op`; the int4 expert cache);
- `pairs_cpu.cpp`, `openk2::float_pairs` and `openk2::int8_pairs`: bf16 experts (fp32 too, as an op)
  and int8 codes with row scales, the rows grouped by expert so that a batch reads each chosen expert
  once; the compiled step takes them for its chosen experts and, at small batches, for its linears
  (a stack of one, `decode_linear`); eager steps take `float_pairs` for few rows an expert
  (`linear.experts_kernel`). On a CPU with AMX, bf16 weights and int8 codes (with bf16 activations)
  go through tile multiplies where the rows are several an expert (`openk2::set_amx`; OPENK2_AMX=0
  turns it off): up to `AMX_ROWS` rows a matrix they beat a library matmul per expert, so prefill
  chunks and the step's linears past small batches take them too; and `openk2::int4_bf16_pairs`
  multiplies by int4 codes dequantised to bf16, the many-rows path of int4 experts
  (`linear.ROUNDED_KERNELS`);
- `attention_cpu.cpp`, `openk2::latent_attention`: the decode step's attention over the latent pool
  past small batches (`openk2.model.attention.LATENT_KERNELS`), each cached row read once for all heads;
- `flash_cpu.cpp`, `openk2::runs_attention` (and its backward): training's causal attention over
  packed runs in AMX tiles, with QK-Clip's max logit (`openk2.model.flash.RUNS_KERNEL`, AMX only);
- `optim_cpu.cpp`, `openk2::muon_momentum`, `openk2::scale_to_bf16` and `openk2::muon_apply`: Muon's
  elementwise passes fused, for the optimizer's CPU step (`openk2.optim.muon`, `cpu_op`).

Built on first use with torch's extension mechanism (`torch.utils.cpp_extension.load`: the machine's
C++ compiler, -O3 -march=native -fopenmp; ~1 min once, then loaded from torch's extension cache) and
registered with fake (shape) implementations, so that torch.compile keeps them inside the compiled
decode step. Without a compiler (or with OPENK2_CPU_KERNELS=0) nothing is registered and the step
fuses its own loops (`openk2.model.linear.matvec`), the reference the kernels are tested against.
"""

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

from openk2.model import attention, flash, linear

# bf16 through AMX tiles serves up to this many rows a matrix eagerly; past it, a library matmul per
# matrix (k2-small's 64 experts of 512×512, 2 cores: 64 rows each 2.3 vs 4.9 ms, 128 rows 5.9 vs 8.2,
# 256 rows 19.3 vs 12.1 ms: the kernel's fp32 output, 33 MB there, comes in fresh pages each call)
AMX_ROWS = 128
# int8 and int4 codes through tiles beat their own paths (a dequantised copy and a matmul per expert) at
# more rows: the Engine's 4,000-token prefill of k2-small (512 rows an expert), int8 2,901 -> 3,925 tok/s,
# int4 2,494 -> 3,968, with this bound rather than AMX_ROWS
AMX_CODES_ROWS = 1024

SOURCES = [Path(__file__).with_name(n)
           for n in ("int4_cpu.cpp", "pairs_cpu.cpp", "attention_cpu.cpp", "optim_cpu.cpp", "flash_cpu.cpp")]
HEADERS = [Path(__file__).with_name("simd_cpu.h")]


def _cpu_tag() -> str:
    """The CPU's feature flags, hashed: the build's name carries them (-march=native), so that a shared
    extension cache never hands one CPU's build to another; the sources' and headers' hash too (a changed
    kernel rebuilds)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return hashlib.sha1(flags.encode() + b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:10]


@functools.cache
def load() -> bool:
    """Build (or load the cached build of) the kernels and register them; False where they cannot be."""
    if os.environ.get("OPENK2_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load as build
        build(name=f"openk2_kernels_{_cpu_tag()}", sources=[str(p) for p in SOURCES],
              extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
              is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the fused loops serve
        warnings.warn(f"openk2's CPU kernels did not build ({type(e).__name__}: {str(e)[:200]}); the decode "
                      "step uses its own fused loops, Muon torch's ops")
        return False

    def pairs_shape(x, w, *rest):  # every pairs kernel: [rows of x, outputs of the stack w], fp32
        return x.new_empty(x.shape[0], w.shape[1], dtype=torch.float32)
    for op in ("int4_pairs", "float_pairs", "int8_pairs", "int4_bf16_pairs"):
        torch.library.register_fake(f"openk2::{op}")(pairs_shape)

    @torch.library.register_fake("openk2::latent_attention")
    def _(q, pool, slots, pos, latent, scale):
        return q.new_empty(q.shape[0], q.shape[1], latent, dtype=torch.float32)

    @torch.library.register_fake("openk2::runs_attention")
    def _(q, k, v, starts, scale):  # out, lse [H, N], the max logit [H]
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)
        return torch.empty_like(v), lse, lse[:, 0].clone()
    torch.library.register_fake("openk2::runs_attention_backward")(
        lambda g, q, k, v, *_: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))
    for dtype in (torch.bfloat16, torch.float32):
        attention.LATENT_KERNELS[dtype] = torch.ops.openk2.latent_attention
    linear.PAIRS_KERNELS[torch.uint8] = torch.ops.openk2.int4_pairs
    linear.PAIRS_KERNELS[torch.int8] = torch.ops.openk2.int8_pairs
    # bf16 only: fp32 experts have no vector path here, and the step's own fp32 paths measured faster
    # (k2-mini fp32, 32 rows: compiled 12.3 vs 13.2 ms a step, eager 14.9 vs 16.1 ms)
    linear.PAIRS_KERNELS[torch.bfloat16] = lambda x, w, scale, idx: torch.ops.openk2.float_pairs(x, w, idx)
    if torch.ops.openk2.set_amx(amx_wanted()):  # tiles take whole 16 × 32 blocks
        # int8 codes too (widened to bf16 tile by tile): with bf16 activations; fp32 ones take the vector
        # path, as many rows as it is given (fp32 models are rarely quantized)
        linear.PAIRS_ROWS[torch.bfloat16], linear.PAIRS_ROWS[torch.int8] = _amx_rows, _amx_codes_rows
        linear.ROUNDED_KERNELS[torch.uint8] = (torch.ops.openk2.int4_bf16_pairs, _rounded_rows)
        flash.RUNS_KERNEL = (torch.ops.openk2.runs_attention, torch.ops.openk2.runs_attention_backward)
    return True


def _tiles(outs: int, ins: int, x_dtype: torch.dtype) -> bool:
    """Tiles take whole 16 × 32 blocks of bf16 activations (int8 codes with fp32 ones keep the vector
    path, which serves few rows)."""
    return outs % 16 == 0 and ins % 32 == 0 and x_dtype == torch.bfloat16


def _amx_rows(outs: int, ins: int, x_dtype: torch.dtype) -> int:
    return AMX_ROWS if _tiles(outs, ins, x_dtype) else linear.KERNEL_ROWS


def _amx_codes_rows(outs: int, ins: int, x_dtype: torch.dtype) -> int:
    return AMX_CODES_ROWS if _tiles(outs, ins, x_dtype) else linear.KERNEL_ROWS


def _rounded_rows(outs: int, ins: int, groups: int) -> int:
    """int4_bf16_pairs: whole tiles and groups of a multiple of 32 inputs, or nothing."""
    return AMX_CODES_ROWS if outs % 16 == 0 and ins % groups == 0 and (ins // groups) % 32 == 0 else 0


def amx_wanted() -> bool:
    """bf16 through AMX tiles unless OPENK2_AMX=0 (where the CPU has them)."""
    return os.environ.get("OPENK2_AMX", "1") != "0"


def cpu_op(name: str):
    """The op `openk2::name` where the kernels are built (None elsewhere: the caller's reference serves)."""
    return getattr(torch.ops.openk2, name) if load() else None


def load_for(device: torch.device) -> bool:
    """`load()` where the kernels serve: models on the CPU."""
    return torch.device(device).type == "cpu" and load()
