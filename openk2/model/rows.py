"""Row counts that change from call to call, padded for CPU's matmul kernels.

On CPU, a reduced-precision (bf16, fp16) matmul runs in oneDNN, which compiles a kernel the first time
it sees a shape and keeps a bounded cache of them. Some row counts change with every batch: an
expert's share of the tokens (the routing), a packed conversation's length, the positions with a
target. Unpadded, most such products of a training step or a prefill paid a compile (1–3 ms, more than
the product; an SFT step of k2-mini at 4 × 2,048 went from 2.4 to 1.2 s once padded). Padded with zero
rows to a few sizes, the shapes repeat and the cache serves them; the caller drops the extra rows of
the result (zero rows add nothing to a weight's gradient). fp32 products (MKL) and GPUs are left as
they are.
"""

import torch


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to one of four sizes per octave (…, 16, 20, 24, 28, 32, 40, 48, …; ≤ 25 % more)."""
    step = 1 << max(0, rows.bit_length() - 3)
    return -(-rows // step) * step


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's products run in: autocast's where it is on for x's device, else x's own."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


def pad_rows(x_MD: torch.Tensor, dtype: torch.dtype, dim: int = 0) -> torch.Tensor:
    """x with zero rows appended along `dim` up to `bucket_rows`, where its product runs on CPU in
    `dtype` (bf16 or fp16); else x itself."""
    rows = x_MD.shape[dim]
    if x_MD.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or bucket_rows(rows) == rows:
        return x_MD
    return torch.nn.functional.pad(x_MD, (0, 0) * (x_MD.dim() - 1 - dim % x_MD.dim()) + (0, bucket_rows(rows) - rows))
