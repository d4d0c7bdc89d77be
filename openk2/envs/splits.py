"""Train/test splits of tasks that measure generalisation, not memory.

`split(tasks, by)` is deterministic per seed and disjoint by construction:
- "seed": held-out world seeds (new states of known tasks);
- "args": held-out argument values (record keys, names, categories, units: the strings the calls
  name); a train task names none of them, a test task at least one;
- "combo": held-out combinations of two or more tools (each tool may be seen in train, never with
  the others of its combination);
- "domain": held-out domains (the test tools were never seen at all).
"""

from __future__ import annotations

import hashlib

SPLITS = ("seed", "args", "combo", "domain")


def bucket(text: str, seed: int) -> float:
    """A stable number in [0, 1) for `text` (sha256, so the same on every machine and Python)."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:12], 16) / 16 ** 12


def values(task) -> set[str]:
    """The strings a task's calls name (resolved arguments) and its answers must repeat."""
    out = {v for cp in task.rubric.checkpoints for c in cp["calls"] for v in c["arguments"].values()}
    out |= {v for turn in task.notes for v in turn}
    return {v for v in out if isinstance(v, str)}


def combo(task) -> str:
    return "+".join(task.rubric.tools)


def held_out_domains(tasks, seed: int = 0) -> list[str]:
    """The default unseen domain: one of the tasks' domains, chosen by the seed."""
    return [min(sorted({t.domain for t in tasks}), key=lambda d: bucket(f"domain:{d}", seed))]


def split(tasks, by: str, test_fraction: float = 0.2, seed: int = 0, test_domains: list[str] | None = None):
    """(train, test) lists of `tasks`."""
    if by == "seed":
        is_test = [bucket(f"seed:{t.seed}", seed) < test_fraction for t in tasks]
    elif by == "args":
        is_test = [any(bucket(f"value:{v}", seed) < test_fraction for v in values(t)) for t in tasks]
    elif by == "combo":
        is_test = [len(t.rubric.tools) > 1 and bucket(f"combo:{combo(t)}", seed) < test_fraction for t in tasks]
    elif by == "domain":
        held = set(test_domains or held_out_domains(tasks, seed))
        is_test = [t.domain in held for t in tasks]
    else:
        raise ValueError(f"unknown split {by!r}; the splits are: {', '.join(SPLITS)}")
    return [t for t, x in zip(tasks, is_test) if not x], [t for t, x in zip(tasks, is_test) if x]
