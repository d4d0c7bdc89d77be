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

import functools
import hashlib

from openk2.envs.spec import domain_names, parts
from openk2.envs.tasks import generate

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


def held_out_combo(tools, seed: int = 0, test_fraction: float = 0.2) -> bool:
    """Whether a combination of two or more tools is held out in split "combo"."""
    return len(set(tools)) > 1 and bucket("combo:" + "+".join(sorted(set(tools))), seed) < test_fraction


def held_out_domains(domains, seed: int = 0) -> list[str]:
    """The default unseen domain: one of `domains`, chosen by the seed."""
    return [min(sorted(set(domains)), key=lambda d: bucket(f"domain:{d}", seed))]


def split(tasks, by: str, test_fraction: float = 0.2, seed: int = 0, test_domains: list[str] | None = None):
    """(train, test) lists of `tasks`."""
    if by == "seed":
        is_test = [bucket(f"seed:{t.seed}", seed) < test_fraction for t in tasks]
    elif by == "args":
        is_test = [any(bucket(f"value:{v}", seed) < test_fraction for v in values(t)) for t in tasks]
    elif by == "combo":
        is_test = [held_out_combo(t.rubric.tools, seed, test_fraction) for t in tasks]
    elif by == "domain":
        held = set(test_domains or held_out_domains([t.domain for t in tasks], seed))
        is_test = [bool(held & set(parts(t.domain))) for t in tasks]  # a merged world holds its parts
    else:
        raise ValueError(f"unknown split {by!r}; the splits are: {', '.join(SPLITS)}")
    return [t for t, x in zip(tasks, is_test) if not x], [t for t, x in zip(tasks, is_test) if x]


def in_distribution(by: str, trained_on: str | None) -> str | None:
    """`held_out`'s `trained_on` for split `by`: seed and args test new states and new values of the
    tasks a model was trained on, so theirs come from the train part of the split its data came from
    too; combo and domain test what that split kept out (so only as unseen when it is theirs)."""
    return trained_on if by in ("seed", "args") else None


@functools.lru_cache(maxsize=8)
def _pool(size: int, seed: int, worlds: tuple | None, kinds: tuple | None) -> list:
    return generate(size, seed, worlds and list(worlds), kinds and list(kinds))


def held_out(by: str, part: str = "test", n: int = 100, seed: int = 0, split_seed: int = 0, worlds=None,
             kinds=None, trained_on: str | None = None) -> list:
    """The first n tasks of `generate(…, seed, worlds, kinds)` in `part` ("train" or "test") of split
    `by`, the unseen domain chosen among all domains. Which part a task falls in depends on the task and
    `split_seed` alone, so synthesis (a train part) and evaluation (a test part) agree whatever their
    generation seeds. The pool grows until n are found (generate(m)'s first tasks are generate(n)'s).

    `trained_on` (ignored when it is `by`): the split whose train part a model's data came from (`openk2
    synth --split S`): only tasks also in that part, none a combination or domain S kept from training
    (without it, ~7 % of the seed split's test tasks are the combo split's held-out combinations)."""
    if part not in ("train", "test"):
        raise ValueError(f"unknown part {part!r}: train or test")
    if trained_on is not None and trained_on not in SPLITS:
        raise ValueError(f"unknown split {trained_on!r}; the splits are: {', '.join(SPLITS)}")
    within = trained_on if trained_on != by else None
    held, size = held_out_domains(domain_names(), split_seed), max(250, 5 * n)
    while True:
        pool = _pool(size, seed, worlds and tuple(worlds), kinds and tuple(kinds))
        if within:
            pool = split(pool, within, seed=split_seed, test_domains=held)[0]
        chosen = split(pool, by, seed=split_seed, test_domains=held)[part == "test"]
        if len(chosen) >= n:
            return chosen[:n]
        if size > 64 * n + 1000:
            raise ValueError(f"the {part} part of split {by!r} holds too few tasks of these worlds and kinds"
                             + (f" in split {within!r}'s train part" if within else ""))
        size *= 4
