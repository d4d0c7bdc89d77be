"""Packed SFT batches: several conversations per row of T positions, each its own segment, so the
model (`segment_ids`) keeps attention inside a conversation and restarts its positions; resumable and
rank-aware like `PackedLoader`.

A conversation of n ids with loss mask m gives n - 1 positions: x = ids[:-1], y = ids[1:] where
m[1:] is 1, AVOID - ids[1:] where it is AVOID_MARK (a token to avoid: `model/head_loss.py`), else
-100 (ignored by `lm_loss`). Each epoch shuffles the conversations by (seed, epoch)
and fills rows first-fit (each conversation goes to the first row with room for it, else opens
one); the rest of a row is padding (id 0, target -100, segment 0, after the conversations' segments
1, 2, …). A global batch is the next B·W rows of the endless stream of epochs, rank r taking the
r-th block of B. State: (seed, epoch, rows of the epoch served), so resume continues with exactly the
rows that would have come next.
Conversations longer than T + 1 ids are cut (`fit_examples`) or dropped, and counted.
"""

import numpy as np
import torch

from openk2.model.head_loss import AVOID
from openk2.tokenizer.sft import AVOID_MARK

IGNORE = -100
PACKING = "first-fit, rows shuffled"  # how an epoch's rows are made: a loader state from another way cannot resume


def fit_examples(examples, seq_len: int, long: str = "truncate"):
    """Examples [(ids, mask)] that fit one row of `seq_len` positions, and counts of what was done:
    truncated / dropped for length (`long`: truncate | drop), dropped for having no loss token left."""
    if long not in ("truncate", "drop"):
        raise ValueError(f"long must be truncate or drop, not {long!r}")
    kept, counts = [], {"truncated": 0, "dropped_long": 0, "dropped_no_loss": 0}
    for ids, mask in examples:
        if len(ids) > seq_len + 1:
            if long == "drop":
                counts["dropped_long"] += 1
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            counts["truncated"] += 1
        if not any(mask[1:]):  # nothing to predict (or only the first token, which nothing precedes)
            counts["dropped_no_loss"] += 1
            continue
        kept.append((ids, mask))
    return kept, counts


def pack_rows(lengths: list[int], order: np.ndarray, seq_len: int) -> list[list[int]]:
    """First-fit: example indices per row, each example (in `order`) in the first row with room for it,
    else a new row; `lengths` are positions (ids - 1), each <= seq_len. The synthesised tool-use data
    fills 94 % of 2,048-position rows, where next-fit (a new row whenever the next example does not
    fit the last) filled 80.5 %."""
    rows, room, shortest = [], np.zeros(len(order), dtype=np.int64), min(lengths[i] for i in order)
    open_ = np.zeros(0, dtype=np.int64)  # rows, in order, with room for the shortest example at least
    for i in order:
        fits = room[open_] >= lengths[i]
        if fits.any():
            r = int(open_[np.argmax(fits)])
        else:
            r = len(rows)
            rows.append([])
            room[r] = seq_len
            open_ = np.append(open_, r)
        rows[r].append(int(i))
        room[r] -= lengths[i]
        if room[r] < shortest:
            open_ = open_[open_ != r]
    return rows


def build_row(examples, members: list[int], seq_len: int):
    """(x, y, segment_ids) int64 [T] of one packed row."""
    x, y = torch.zeros(seq_len, dtype=torch.long), torch.full((seq_len,), IGNORE, dtype=torch.long)
    seg, at = torch.zeros(seq_len, dtype=torch.long), 0
    for k, i in enumerate(members, 1):
        ids, mask = examples[i]
        n = len(ids) - 1
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask[1:])
        x[at:at + n], seg[at:at + n] = ids_t[:-1], k
        avoided = torch.where(mask_t == AVOID_MARK, AVOID - ids_t[1:], IGNORE)
        y[at:at + n] = torch.where(mask_t == 1, ids_t[1:], avoided)
        at += n
    return x, y, seg


def stack_rows(examples, rows: list[list[int]], seq_len: int):
    """(x, y, segment_ids) [B, T] of several rows."""
    return tuple(torch.stack(t) for t in zip(*(build_row(examples, r, seq_len) for r in rows)))


class PackedSFTLoader:
    """Endless (x, y, segment_ids) batches [B, T] for one rank; see the module docstring."""

    def __init__(self, examples, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not examples:
            raise ValueError("no training conversations")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.lengths = [len(ids) - 1 for ids, _ in examples]
        if max(self.lengths) > seq_len:
            raise ValueError(f"a conversation of {max(self.lengths) + 1} ids exceeds seq_len {seq_len} + 1: "
                             "fit_examples first")
        self.epoch, self.position = 0, 0
        self._rows = (None, None)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows[0] != (self.seed, epoch):
            rng = np.random.default_rng([self.seed, epoch])
            rows = pack_rows(self.lengths, rng.permutation(len(self.examples)), self.seq_len)
            # first-fit pulls short conversations forward: shuffled rows keep every part of an epoch alike
            self._rows = ((self.seed, epoch), [rows[i] for i in rng.permutation(len(rows))])
        return self._rows[1]

    def _take(self, count: int) -> list[list[int]]:
        out = []
        while len(out) < count:
            rows = self.epoch_rows(self.epoch)
            n = min(count - len(out), len(rows) - self.position)
            out += rows[self.position:self.position + n]
            self.position += n
            if self.position == len(rows):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self):
        rows = self._take(self.batch_size * self.world_size)
        return stack_rows(self.examples, rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size],
                          self.seq_len)

    def fill(self) -> float:
        """Share of an epoch's positions that hold conversation tokens (not padding)."""
        return sum(self.lengths) / (len(self.epoch_rows(0)) * self.seq_len)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "seq_len": self.seq_len,
                "n_examples": len(self.examples), "n_positions": sum(self.lengths), "packing": PACKING}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.seq_len, len(self.examples), sum(self.lengths))
        theirs = (state["seq_len"], state["n_examples"], state["n_positions"])
        if mine != theirs:
            raise ValueError(f"loader state is for (seq_len, conversations, positions) = {theirs}, this data "
                             f"gives {mine}: not the same data, resume would not be exact")
        if state.get("packing") != PACKING and state["position"]:
            raise ValueError(f"loader state is from mid-epoch rows packed another way ({state.get('packing')}), "
                             f"this version packs {PACKING}: resume would not be exact; finish that run with the "
                             "version that started it")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


def sft_val_batches(examples, batch_size: int, seq_len: int, n_batches: int, *, rank: int = 0,
                    world_size: int = 1):
    """A fixed validation set: the held-out conversations packed in file order, `n_batches` global
    batches of consecutive rows (wrapping), this rank's block of each."""
    if not examples:
        raise ValueError("no validation conversations")
    rows = pack_rows([len(ids) - 1 for ids, _ in examples], np.arange(len(examples)), seq_len)
    per_step, out = batch_size * world_size, []
    for step in range(n_batches):
        first = step * per_step + rank * batch_size
        out.append(stack_rows(examples, [rows[i % len(rows)] for i in range(first, first + batch_size)], seq_len))
    return out
