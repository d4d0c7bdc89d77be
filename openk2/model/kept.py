"""Per-step buffers on memory kept from the step before (CPU training).

On CPU a fresh tensor of many MB comes from new pages, each faulted in on its first write: for the
bf16 casts of k2-small's expert stacks and their fp32 weight gradients (~100 MB a layer) that was a
third of the backward. A buffer a parameter needs every step takes the storage it had last time, but
only once nothing else references that storage: a gradient handed to autograd is reused after
`zero_grad` (or anything else) has let go of it, a cast saved for backward after that backward. CUDA's
caching allocator reuses freed memory itself, so elsewhere these are plain `torch.empty`.

Notes: "references" are tensors (views included); a bare `t.untyped_storage()` kept by a caller is the
same Python object this module holds, not counted apart: hold the tensor, or clone it. The memory
stays with its owner for the owner's life (after `zero_grad(set_to_none=True)` too).
"""

import torch
from torch.utils.weak import WeakIdKeyDictionary

_KEPT = WeakIdKeyDictionary()  # owner tensor -> {slot: UntypedStorage}
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def kept_empty(owner: torch.Tensor, slot: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for `owner`'s buffer `slot`, on that slot's storage of the last call
    where its only reference left is this module's and it is large enough (a smaller shape takes its start)."""
    device = owner.device
    if device.type != "cpu" or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    slots = _KEPT.setdefault(owner, {})
    st = slots.get(slot)
    if st is None or st.nbytes() < dtype.itemsize * torch.Size(shape).numel() or _use_count(st._cdata) > 1:
        t = torch.empty(shape, dtype=dtype, device=device)
        slots[slot] = t.untyped_storage()
        return t
    return torch.empty(0, dtype=dtype, device=device).set_(st, 0, shape)


def kept_cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w in `dtype` (w itself where it already is), the copy on kept memory."""
    return w if w.dtype == dtype else kept_empty(w, "cast", w.shape, dtype).copy_(w)
