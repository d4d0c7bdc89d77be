"""The engine's latent KV cache: fixed-size blocks of token rows in one pool, a free list, and
per-request block tables.

Per layer the pool is [num_blocks, block_size, L] (L = C + R: K2's 576 values per token). A request
owns a list of blocks; memory is bounded by the pool, and a request that can never fit is refused
up front. The model's forward attends over contiguous rows, so an eager step gathers each running request's
blocks into a padded batch cache (`gather`) and writes the rows the step produced back (`scatter`);
the compiled decode step (`decode.py`) reads and writes the pool rows (`rows`) in place through a
slot table (`slots`) instead.
"""

import torch

from openk2.config import ModelConfig
from openk2.model.attention import LatentCache


class CacheFull(RuntimeError):
    """Not enough free blocks now (the request waits) — distinct from a request that can never fit."""


class BlockPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32,
                 device="cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.pools = [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device)
                      for _ in range(cfg.num_hidden_layers)]
        self.rows = [pool.view(-1, width) for pool in self.pools]  # [num_blocks · block_size, L] views
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: the last freed is reused first

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table in place so it holds n_tokens rows; CacheFull if the pool cannot."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self.free):
            raise CacheFull(f"{need} blocks needed, {len(self.free)} free")
        table.extend(self.free.pop() for _ in range(max(need, 0)))

    def release(self, table: list[int]) -> None:
        self.free.extend(reversed(table))
        table.clear()

    def slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """[R, length] pool row indices (block · block_size + offset); padding points at row 0."""
        pos = torch.arange(length)
        idx = torch.zeros(len(tables), length, dtype=torch.long)
        for r, table in enumerate(tables):
            n = min(length, len(table) * self.block_size)
            blocks = torch.tensor(table, dtype=torch.long)[pos[:n] // self.block_size]
            idx[r, :n] = blocks * self.block_size + pos[:n] % self.block_size
        return idx

    def gather(self, tables: list[list[int]], length: int) -> list[LatentCache]:
        """A batch cache [R, length, L] per layer holding each request's rows (past the end of its
        blocks, copies of pool row 0: padding the model masks or overwrites)."""
        idx = self.slots(tables, length).flatten()
        return [LatentCache(rows.index_select(0, idx).view(len(tables), length, -1)) for rows in self.rows]

    def scatter(self, cache: list[LatentCache], tables: list[list[int]], starts: list[int],
                counts: list[int]) -> None:
        """Write rows starts[r] .. starts[r] + counts[r] of each batch row back into the pool."""
        idx = self.slots(tables, max(s + n for s, n in zip(starts, counts)))
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(counts)])
        cols = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
        for flat, c in zip(self.rows, cache):
            flat[idx[rows, cols]] = c.ckv[rows, cols]
