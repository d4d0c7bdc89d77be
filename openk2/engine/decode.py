"""The decode step compiled: one new token per running request, attending straight from the engine's
block pool.

The step itself is model code: `Transformer.decode` (absorbed MLA over the pool in `MLA.decode`, the
MoE in `MoE.decode`), written so that torch.compile (inductor) turns a whole step into a few dozen
fused loops instead of ~10³ library calls, which is what eager decode on a CPU pays for (per-op
overhead and ~30 µs per small bf16 matmul call); its reference, `Transformer.decode_reference`, sits
beside it. Here is what the engine adds: `CompiledDecode` compiles it once per model, picks where it
pays (quantized weights: small batches only), and falls back to the reference when the compiler
fails; `compilable` says whether a model's weights can be read as tensors at all (each linear's face,
`openk2.model.linear.decode_weights`: int4 codes cannot); `decode_kernels` picks the matmul kernels
of an eager step. This module knows no quantization format: it reads the face.
"""

import contextlib
import time
import warnings

import torch
from torch import nn

from openk2.model.linear import decode_weights
from openk2.model.moe import small_batch
from openk2.model.transformer import Transformer

__all__ = ["CompiledDecode", "compilable", "decode_kernels", "small_batch"]


def _faces(model: nn.Module) -> list:
    """The decode face of every linear-like module: torch's nn.Linear, or a module presenting one."""
    return [decode_weights(m) for m in model.modules() if isinstance(m, nn.Linear) or hasattr(m, "decode_weights")]


def compilable(model: Transformer) -> bool:
    """Whether the step can read every weight as a tensor: float or int8, not int4 (whose CPU kernel
    layout is opaque: its face is None)."""
    return all(face is not None for face in _faces(model))


@contextlib.contextmanager
def decode_kernels(model: Transformer, rows: int):
    """Matmul kernels for a decode step of `rows` tokens.

    On CPU, oneDNN's bf16/fp16 matmul costs ~30 µs a call whatever its size, while ATen's own kernel
    takes ~11 µs for a single row (and far longer for many): one- or two-row decode steps, where
    every matmul is a matrix-vector product, run without oneDNN (bench/forward.py measures it).
    The switch is process-wide (`torch.backends.mkldnn.enabled`): not for concurrent threads.
    """
    w = model.lm_head.weight
    off = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and rows <= 2
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and not off
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError,
                  torch._inductor.exc.CppCompileError)


class CompiledDecode:
    """`Transformer.decode` through torch.compile, for one model. Shapes are symbolic (any batch, any
    cache length); a graph is compiled on first use per regime (one row, `small_batch`, larger) — tens
    of seconds each on a small CPU, and inductor keeps the generated code on disk for later processes.
    If compiling fails (no C++ compiler, say), it warns once and runs the reference instead."""

    def __init__(self, model: Transformer):
        if not compilable(model):
            raise ValueError("the compiled decode step needs float or int8 weights (int4 runs eagerly)")
        self.model, self.failed = model, False
        # quantized weights (faces with scales: int8) compile for small batches only, where their
        # fused loops win; larger batches keep the quantized modules' own kernels (the reference)
        self.scaled = any(face[1] is not None for face in _faces(model))
        self._fn = torch.compile(Transformer.decode, dynamic=True)

    def warm(self, batch_sizes, progress=None) -> None:
        """Compile now the graph of each of `batch_sizes` (one per regime), running each once on a
        scratch cache of its own: no engine state is touched, so this may run on a thread beside an
        engine that decodes eagerly meanwhile. progress(message) hears of each graph as it is ready."""
        cfg, w = self.model.cfg, self.model.lm_head.weight
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        for n in batch_sizes:
            if self.failed or not self._compiles(n):
                continue  # nothing to compile (and the reference step flips a process-wide flag)
            t0 = time.perf_counter()
            # made as the engine makes its own (the pool outside inference mode, the step's inputs
            # inside), so that the graphs' guards match the engine's calls
            pools = [torch.zeros(2 * n + 3, width, dtype=w.dtype, device=w.device)
                     for _ in range(cfg.num_hidden_layers)]
            with torch.inference_mode():
                ids = torch.zeros(n, dtype=torch.long, device=w.device)
                pos = torch.ones(n, dtype=torch.long, device=w.device)  # two positions a row, as in the
                slots = torch.arange(2 * n, device=w.device).view(n, 2)  # step after a one-token prompt
                self(ids, pos, slots, pools)
            if progress:
                progress(f"decode step compiled for {n} row{'s' * (n > 1)} ({time.perf_counter() - t0:.0f} s)")

    def _compiles(self, rows: int) -> bool:
        return not self.scaled or small_batch(rows, self.model.cfg)

    def __call__(self, ids_N, pos_N, slots_NT, pools_ZL):
        if not self.failed and self._compiles(ids_N.shape[0]):
            try:
                return self._fn(self.model, ids_N, pos_N, slots_NT, pools_ZL)
            except COMPILE_ERRORS as e:  # the compiler's own failure (errors at run time propagate)
                warnings.warn(f"torch.compile failed, decoding eagerly: {type(e).__name__}: {e}")
                self.failed = True  # the reference rewrites any pool rows a partial run wrote
        with decode_kernels(self.model, ids_N.shape[0]):
            return self.model.decode_reference(ids_N, pos_N, slots_NT, pools_ZL)
