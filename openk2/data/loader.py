"""Packed, shuffled, exactly resumable, rank-aware batches from a flat stream of token ids.

The stream (`corpus.tokenize_to_cache`) holds documents back to back, each [bos] … [eos]. It is cut
into windows of T + 1 tokens starting every T tokens (window i = tokens[i·T : i·T + T + 1]), so no
token is dropped as an input and none twice; x is a window's first T tokens, y its last T. Windows
cross document boundaries and attention is not masked there (as in nanoGPT/nanochat): the bos/eos
tokens in the stream are the only boundary marks.

Order: each epoch is a permutation of all window indices, seeded by (seed, epoch), and the epochs run
back to back as one endless stream. A global batch is the next B·W indices of that stream, and rank
r takes the r-th block of B, so W ranks with batch B together see exactly what one rank with batch
B·W sees, and world size 1 is the same path (STYLE §2). The whole state is (seed, epoch, position in
the epoch, counted in windows), saved by `state_dict()` with the checkpoint; `load_state_dict`
continues with exactly the batches that would have come next, under any world size with the same
global batch. Validation (`val_batches`) takes windows of the held-out stream in order, unshuffled.
"""

import numpy as np
import torch


def n_windows(n_tokens: int, seq_len: int) -> int:
    """How many (T + 1)-token windows, starting every T tokens, fit in `n_tokens`."""
    return (n_tokens - 1) // seq_len


def _check_stream(tokens: np.ndarray, seq_len: int, batch_size: int, rank: int, world_size: int):
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"corpus too short: {len(tokens)} tokens, but one sequence of seq_len={seq_len} needs "
            f"{seq_len + 1} (inputs plus the shifted target); use more data or a shorter seq_len"
        )


def gather_windows(tokens: np.ndarray, window_idx_B: np.ndarray, seq_len: int):
    """(x, y) int64 [B, T] from window indices; y is x shifted left by one token.

    Shapes: window_idx_B [B] -> x_BT, y_BT [B, T].
    """
    pos_BW = window_idx_B[:, None] * seq_len + np.arange(seq_len + 1)  # W = T + 1
    win_BW = torch.from_numpy(np.asarray(tokens[pos_BW], dtype=np.int64))
    return win_BW[:, :-1], win_BW[:, 1:]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The window order for one epoch: a permutation of range(n), a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class PackedLoader:
    """Endless (x, y) batches [B, T] for one rank; see the module docstring for order and state."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        _check_stream(tokens, seq_len, batch_size, rank, world_size)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_windows = n_windows(len(tokens), seq_len)
        self.epoch, self.position = 0, 0  # position: windows of this epoch already served (all ranks)
        self._order = (None, None)  # ((seed, epoch), that epoch's permutation), cached

    def _epoch_order(self) -> np.ndarray:
        if self._order[0] != (self.seed, self.epoch):
            self._order = ((self.seed, self.epoch), epoch_order(self.n_windows, self.seed, self.epoch))
        return self._order[1]

    def _take(self, count: int) -> np.ndarray:
        """The next `count` window indices of the global stream, rolling over epochs as needed."""
        parts = []
        while count:
            n = min(count, self.n_windows - self.position)
            parts.append(self._epoch_order()[self.position : self.position + n])
            self.position, count = self.position + n, count - n
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's block of the next global batch: (x, y) int64 [B, T]."""
        global_idx = self._take(self.batch_size * self.world_size)
        mine = global_idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return gather_windows(self.tokens, mine, self.seq_len)

    def __iter__(self):
        while True:  # endless: the training loop counts steps, epochs roll over inside
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The stream must be the same (same T, same window count)."""
        mine, theirs = (self.seq_len, self.n_windows), (state["seq_len"], state["n_windows"])
        if mine != theirs:
            raise ValueError(
                f"loader state is for seq_len={theirs[0]} over {theirs[1]} windows, but this loader "
                f"has seq_len={mine[0]} over {mine[1]}: not the same token stream, resume would not be exact"
            )
        if not 0 <= state["position"] < self.n_windows or state["epoch"] < 0:
            raise ValueError(f"loader state out of range: {state}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int, *,
                rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: `n_batches` global batches of consecutive windows from the start of
    the held-out stream (wrapping if it is short), this rank's block of each, as (x, y) [B, T]."""
    _check_stream(tokens, seq_len, batch_size, rank, world_size)
    n, per_step = n_windows(len(tokens), seq_len), batch_size * world_size
    out = []
    for step in range(n_batches):
        first = step * per_step + rank * batch_size
        out.append(gather_windows(tokens, np.arange(first, first + batch_size) % n, seq_len))
    return out
