"""The decode step compiled: one new token per running request, attending straight from the engine's
block pool.

The step itself is model code: `Transformer.decode` (absorbed MLA over the pool in `MLA.decode`, the
MoE in `MoE.decode`), written so that torch.compile (inductor) turns a whole step into a few dozen
fused loops instead of ~10³ library calls, which is what eager decode on a CPU pays for (per-op
overhead and ~30 µs per small bf16 matmul call); its reference, `Transformer.decode_reference`, sits
beside it. Here is what the engine adds: `CompiledDecode` compiles it once per model, picks where it
pays (quantized weights without openk2's kernels for them: small batches only), and falls back to
the reference when the compiler fails; `compilable` says whether a model's weights can be read as
tensors at all (each linear's face, `openk2.model.linear.decode_weights`); `decode_kernels` picks
the matmul kernels of an eager step. This module knows no quantization format: it reads the face.
"""

import contextlib
import itertools
import threading
import time
import types
import warnings
import weakref

import torch
from torch import nn

from openk2 import kernels
from openk2.model.linear import decode_weights, pairs_kernel
from openk2.model.moe import small_batch
from openk2.model.transformer import Transformer

__all__ = ["CompiledDecode", "compilable", "decode_kernels", "small_batch"]


def _faces(model: nn.Module) -> list:
    """The decode face of every linear-like module: torch's nn.Linear, or a module presenting one."""
    return [decode_weights(m) for m in model.modules() if isinstance(m, nn.Linear) or hasattr(m, "decode_weights")]


def compilable(model: Transformer) -> bool:
    """Whether the step can read every weight as a tensor: float, int8 and int4 weights can; a module
    whose face is None (weights in an opaque layout) cannot."""
    return all(face is not None for face in _faces(model))


class _OneDNNOff:
    """oneDNN switched off while any eager decode step needs it off, on any thread, and back on (as it
    was) when the last one leaves: overlapping users — the engine's thread and a background compile's
    fallback, nested calls — can never leave it stuck off, nor turn it on under another's step."""

    def __init__(self):
        self._lock, self._users, self._was = threading.Lock(), 0, True

    @contextlib.contextmanager
    def __call__(self):
        with self._lock:
            if self._users == 0:
                self._was = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    torch.backends.mkldnn.enabled = self._was


_onednn_off = _OneDNNOff()  # one per process, as the flag it guards


def decode_kernels(model: Transformer, rows: int):
    """Matmul kernels for an eager decode step of `rows` tokens (a context manager).

    On CPU, oneDNN's bf16 matmul costs 2-3x ATen's own matrix-vector kernel at one or two rows on
    weights that are not in cache (one thread: a 512×512 weight ~100 vs ~45 µs, k2-small's lm_head
    ~1.2 vs ~0.55 ms), so an eager k2-small bf16 step takes ~2x as long with it (bench/forward.py).
    ATen has no per-call way to pick its own kernel over oneDNN's for bf16 (mm, bmm, mv and linear
    all ask one process-wide switch, `torch.backends.mkldnn.enabled`; prepacked oneDNN weights would
    hold every weight twice), so one- and two-row eager steps turn that switch off. `_OneDNNOff` is
    the only code in openk2 that sets a torch.backends flag (tests/test_layout.py). Being process-wide,
    it also slows another thread's bf16 matmuls meanwhile (same results), and inductor registers its
    oneDNN fusion passes only if the switch is on when it first compiles in a process. The compiled
    step needs none of it (its small-batch matmuls are openk2's kernels, or fused loops); only its
    fallback does.
    """
    w = model.lm_head.weight
    native = w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16) and rows <= 2
    return _onednn_off() if native else contextlib.nullcontext()


COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError,
                  torch._inductor.exc.CppCompileError)


def _weight_guard(entry) -> bool:
    """dynamo's guards to keep: all but its per-tensor checks of the model's weights and buffers
    (dtype, shape, strides, aliasing of ~10² tensors: ~0.25 ms of a ~3 ms k2-small step), which
    `_StepFor.current` replaces by one check of their dtypes, shapes and strides per engine."""
    return not (entry.guard_type in ("TENSOR_MATCH", "DUPLICATE_INPUT")
                and ("._parameters[" in entry.name or "._buffers[" in entry.name))


class _StepFor:
    """The compiled step of one model: `Transformer.decode` under a code object of its own (dynamo keeps
    graphs per code object, so no other model's call can reach these graphs), with the weight guards
    dropped (see above). Kept per model across engines (`_STEPS`), so a new Engine on the same model
    finds its graphs; an engine whose model's weights changed dtype, shape or device since (model.to,
    a swapped weight) starts over. Within one engine's life the weights' values may change (RL's
    weight sync updates them in place), not their dtypes or shapes."""

    def __init__(self, signature: tuple, device: torch.device):
        f = Transformer.decode
        code = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        # fullgraph: one frame, the one with a code object of its own (a graph break would leave nested
        # frames, shared by every model, with their weight guards dropped too); a break is a compile error.
        # On CPU the graph's wrapper is C++ (`cpp_wrapper`): a step calls ~50 kernels, and from C++ each call
        # costs less than from inductor's Python wrapper (k2-small int8: 2.95 -> 2.68 ms a step)
        options = {"guard_filter_fn": lambda entries: [_weight_guard(e) for e in entries],
                   "cpp_wrapper": torch.device(device).type == "cpu"}
        self.fn = torch.compile(code, dynamic=True, fullgraph=True, options=options)
        self.signature = signature

    @staticmethod
    def signature_of(model) -> tuple:
        return tuple((t.dtype, t.shape, t.stride(), t.device)
                     for t in itertools.chain(model.parameters(), model.buffers()))

    @classmethod
    def current(cls, model: Transformer) -> "_StepFor":
        step, signature = _STEPS.get(model), cls.signature_of(model)
        if step is None or step.signature != signature:
            step = _STEPS[model] = cls(signature, model.lm_head.weight.device)
        return step


_STEPS: "weakref.WeakKeyDictionary[Transformer, _StepFor]" = weakref.WeakKeyDictionary()
_ONE_STEP = threading.Lock()  # see CompiledDecode._run


class CompiledDecode:
    """`Transformer.decode` through torch.compile, for one model. Shapes are symbolic (any batch, any
    cache length); a graph is compiled on first use per regime (one row, `small_batch`, larger) — tens
    of seconds each on a small CPU, and inductor keeps the generated code on disk for later processes.
    If compiling fails (no C++ compiler, say), it warns once and runs the reference instead."""

    def __init__(self, model: Transformer):
        if not compilable(model):
            raise ValueError("the compiled decode step cannot read this model's weights: a linear-like module "
                             "presents no decode face (openk2.model.linear.decode_weights)")
        self.model, self.failed = model, False
        kernels.load_for(model.lm_head.weight.device)  # the experts' kernels (openk2.kernels)
        # quantized weights (faces with scales: int8, int4) compile at every batch where openk2's kernels
        # read them (each chosen expert once for all its rows; k2-small int8 at max_batch 32: 630 -> 1,264
        # tok/s), else for small batches only, where the fused loops win, larger ones keeping the
        # quantized modules' own paths (the reference)
        scaled = [face for face in _faces(model) if face[1] is not None]
        self.small_only = bool(scaled) and not all(pairs_kernel(face[0]) is not None for face in scaled)
        self._fn = _StepFor.current(model).fn
        self._ran: set = set()  # batch regimes whose graph has run here: their calls skip most guards

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
        return not self.small_only or small_batch(rows, self.model.cfg)

    def _guards(self, regime):
        """Once a regime's graph has run, its calls evaluate only the guards that tell dynamo's graphs
        apart (the batch size's regime), not all of them (~0.3 ms of a ~4 ms k2-small step). What
        the others check cannot change within an engine's life: the weights' dtypes and shapes are
        fixed (`_StepFor`), the step reads no mutable flag, and every regime's first call runs all."""
        if regime not in self._ran:
            return contextlib.nullcontext()
        return torch.compiler.set_stance(torch._dynamo.eval_frame._stance.stance, skip_guard_eval_unsafe=True)

    def _run(self, regime, *args):
        # torch's stance is process-wide: one compiled step at a time, so that no other thread's step
        # (another engine's first call, compiling) runs under this one's skipped guards
        with _ONE_STEP:
            try:
                with self._guards(regime):
                    logits = self._fn(self.model, *args)
            except RuntimeError as e:  # torch refuses to compile without all guards: with them, then
                if regime not in self._ran or "skip_guard_eval_unsafe" not in str(e):
                    raise
                self._ran.discard(regime)
                logits = self._fn(self.model, *args)
        self._ran.add(regime)
        return logits

    def __call__(self, ids_N, pos_N, slots_NT, pools_ZL):
        n = ids_N.shape[0]
        if not self.failed and self._compiles(n):
            regime = (n == 1, small_batch(n, self.model.cfg))
            try:
                return self._run(regime, ids_N, pos_N, slots_NT, pools_ZL)
            except COMPILE_ERRORS as e:  # the compiler's own failure (errors at run time propagate)
                warnings.warn(f"torch.compile failed, decoding eagerly: {type(e).__name__}: {e}")
                self.failed = True  # the reference rewrites any pool rows a partial run wrote
        with decode_kernels(self.model, ids_N.shape[0]):
            return self.model.decode_reference(ids_N, pos_N, slots_NT, pools_ZL)
