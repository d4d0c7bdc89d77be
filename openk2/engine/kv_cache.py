"""The engine's latent KV cache: fixed-size blocks of token rows in one pool, a free list, and
per-request block tables.

Per layer the pool is [num_blocks, block_size, L] (L = C + R: K2's 576 values per token). A request
owns a list of blocks; memory is bounded by the pool, and a request that can never fit is refused
up front. The model's forward attends over contiguous rows, so an eager step gathers each running
request's rows into a padded batch cache (`gather` by block tables, `read` by a slot table) and writes
the rows the step produced back (`scatter`; `write`: a decode step's one row per request), unless each
request's blocks are consecutive, as a fresh pool hands them out: then the batch cache is a view of
the pool (`view`), read and written in place. The compiled decode step (`decode.py`) reads and writes
the pool rows (`rows`) in place through a slot table (`slots`) instead.

Prefix cache: full blocks whose rows are computed can be registered under a digest of every token up
to their end (`register`); a later request whose prompt starts with those tokens shares the blocks
(`match`, `share`: reference-counted, read-only — a request only writes rows after its shared ones)
and computes only the rest. A registered block no request holds is idle: kept, least recently used
first out, until a new block is needed (`grow` takes free blocks first, then evicts idle ones).
"""

import hashlib
from collections import OrderedDict

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
        self.device = self.rows[0].device
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: the last freed is reused first
        self.refs = [0] * num_blocks  # requests holding each block
        self.index: dict[bytes, int] = {}  # digest of the tokens up to a block's end -> the block
        self.digest_of: dict[int, bytes] = {}  # registered blocks
        self.idle: OrderedDict[int, None] = OrderedDict()  # registered, held by none: least recent first

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def available(self) -> int:
        """Blocks a request can get now: free ones and idle registered ones (evicted on demand)."""
        return len(self.free) + len(self.idle)

    def digests(self, tokens: list[int]) -> list[bytes]:
        """One digest per full block of `tokens`, each covering every token up to that block's end."""
        out, h, B = [], b"", self.block_size
        for i in range(len(tokens) // B):
            h = hashlib.blake2b(h + repr(tokens[i * B:(i + 1) * B]).encode(), digest_size=16).digest()
            out.append(h)
        return out

    def match(self, tokens: list[int]) -> list[int]:
        """The registered blocks holding the longest full-block prefix of `tokens` (not yet shared)."""
        out = []
        for d in self.digests(tokens):
            if d not in self.index:
                break
            out.append(self.index[d])
        return out

    def forget(self) -> None:
        """Drop every registered block (their rows were computed by weights that have changed): idle ones
        become free; blocks a request still holds stay its own."""
        self.free.extend(reversed(self.idle))
        self.index.clear(), self.digest_of.clear(), self.idle.clear()

    def fits(self, shared: list[int], n_tokens: int) -> bool:
        """Whether a table of n_tokens rows starting with the `shared` blocks can be had now."""
        return self.blocks_for(n_tokens) - len(shared) <= self.available - sum(b in self.idle for b in shared)

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1
            self.idle.pop(b, None)

    def register(self, table: list[int], tokens: list[int]) -> None:
        """Offer the full blocks of `table` whose rows hold `tokens` (computed) to later requests; a block
        whose digest another block already has stays private."""
        for b, d in zip(table, self.digests(tokens)):
            if d not in self.index and b not in self.digest_of:
                self.index[d], self.digest_of[b] = b, d

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def grow(self, table: list[int], n_tokens: int) -> None:
        """Extend a block table in place so it holds n_tokens rows; CacheFull if the pool cannot."""
        need = self.blocks_for(n_tokens) - len(table)
        if need > self.available:
            raise CacheFull(f"{need} blocks needed, {self.available} available")
        for _ in range(max(need, 0)):
            b = self.free.pop() if self.free else self._evict()
            self.refs[b] = 1
            table.append(b)

    def _evict(self) -> int:
        b, _ = self.idle.popitem(last=False)
        del self.index[self.digest_of.pop(b)]
        return b

    def reserve(self, table: list[int], n_tokens: int) -> tuple[torch.Tensor, int | None]:
        """Grow a table (empty, or holding shared blocks) to n_tokens rows (CacheFull if the pool cannot):
        its slot row [n_tokens] on the pool's device, and its first pool row when its blocks are
        consecutive (else None)."""
        self.grow(table, n_tokens)
        one_run = table == list(range(table[0], table[0] + len(table)))
        return self.slots([table], n_tokens)[0].to(self.device), table[0] * self.block_size if one_run else None

    def release(self, table: list[int]) -> None:
        """Drop a request's hold on its blocks: a block nobody holds becomes free, or idle if registered."""
        for b in reversed(table):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.digest_of:
                    self.idle[b] = None
                else:
                    self.free.append(b)
        table.clear()

    def slots(self, tables: list[list[int]], length: int) -> torch.Tensor:
        """[R, length] pool row indices (block · block_size + offset); past the end of a table, rows of
        block 0 (padding, which the step masks)."""
        n, pos_T = self.blocks_for(length), torch.arange(length)
        blocks_RN = torch.tensor([t[:n] + [0] * (n - len(t)) for t in tables], dtype=torch.long)
        return blocks_RN[:, pos_T // self.block_size] * self.block_size + pos_T % self.block_size

    def gather(self, tables: list[list[int]], length: int) -> list[LatentCache]:
        """A batch cache [R, length, L] per layer holding each request's rows (past the end of its
        blocks, copies of block 0's rows: padding the model masks or overwrites)."""
        return self.read(self.slots(tables, length))

    def read(self, slots_RT: torch.Tensor) -> list[LatentCache]:
        """A batch cache [R, T, L] per layer: the pool rows `slots_RT` names."""
        idx = slots_RT.flatten()
        return [LatentCache(rows.index_select(0, idx).view(*slots_RT.shape, -1)) for rows in self.rows]

    def view(self, firsts: list[int | None], length: int) -> list[LatentCache] | None:
        """The batch cache [R, length, L] per layer as a view of the pool, when row r's rows are the run
        from pool row firsts[r] and the runs lie equally spaced, none overlapping the next (requests whose
        blocks are consecutive, as a fresh pool hands them out); None otherwise. A step then reads and
        writes the pool in place: no copy of the cache, nothing to write back."""
        step = firsts[1] - firsts[0] if len(firsts) > 1 and None not in firsts[:2] else length
        if None in firsts or step < length or firsts[-1] + length > self.capacity \
                or any(b - a != step for a, b in zip(firsts, firsts[1:])):
            return None
        L = self.rows[0].shape[-1]
        return [LatentCache(rows.as_strided((len(firsts), length, L), (step * L, L, 1), firsts[0] * L))
                for rows in self.rows]

    def write(self, cache: list[LatentCache], slots_RT: torch.Tensor, starts: list[int]) -> None:
        """Write the row at position starts[r] of each batch row back to its pool row `slots_RT[r,
        starts[r]]` (a decode step's one new row per request)."""
        device, s = slots_RT.device, starts[0]
        # rows at one position (one row; a batch that started together): plain views, no index tensors
        at = (slice(None), s) if starts.count(s) == len(starts) else \
            (torch.arange(len(starts), device=device), torch.tensor(starts, device=device))
        new_R = slots_RT[at]
        for flat, c in zip(self.rows, cache):
            flat.index_copy_(0, new_R, c.ckv[at])

    def scatter(self, cache: list[LatentCache], tables: list[list[int]], starts: list[int],
                counts: list[int]) -> None:
        """Write rows starts[r] .. starts[r] + counts[r] of each batch row back into the pool."""
        idx = self.slots(tables, max(s + n for s, n in zip(starts, counts)))
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(counts)])
        cols = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
        for flat, c in zip(self.rows, cache):
            flat[idx[rows, cols]] = c.ckv[rows, cols]
