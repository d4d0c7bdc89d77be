"""`--minutes`: a run's step count fitted to a wall-clock budget.

A run given `minutes` trains for the steps that fit in that many minutes of its training loop (evaluations
and checkpoints included), never more than `steps`, with the whole WSD schedule: warmup, then the peak,
then the decay over the last `decay_frac` of the steps it will run. While the learning rate is still at
its peak, after each step (from the `MEASURE`-th on), the step count is planned again from the rate
measured so far; the plan is fixed once the decay begins. A step at the peak is the same step whatever
the run's length, so a budgeted run computes what a run with `--steps` set to the count it chose
computes (tests/test_budget.py). A resumed run goes on with the time its checkpoint had used, and with
its plan, fixed or not.
"""

import time

import torch
import torch.distributed as dist

from openk2.train.config import TrainConfig

MEASURE = 10  # steps timed before the first plan (the first steps pay for warm-up: allocation, kernels)
CLOCK = time.monotonic  # seconds (tests give it a clock of their own)


def decay_start(steps: int, cfg: TrainConfig) -> int:
    """The first step whose learning rate is below the peak in a run of `steps` steps (`lr_at`; with no
    decay, the last step, at the final rate)."""
    return steps - max(1, cfg.decay_steps_of(steps))


def _fits(steps: int, cfg: TrainConfig) -> bool:
    """TrainConfig's own rule: warm-up and decay within the run, one step at least between them."""
    return cfg.warmup_steps + cfg.decay_steps_of(steps) <= steps - 1


def plan(cfg: TrainConfig, step: int, used_s: float, rate_s: float, most: int) -> tuple[int, bool]:
    """(steps, fixed): the run's step count after `step` steps that used `used_s` seconds of the budget, at
    `rate_s` seconds a step from here on; at most `most` steps (a valid run whose decay starts after `step`:
    the caller plans only then) and at least what keeps the steps run so far at the peak. Fixed once the
    next step's learning rate is below the peak."""
    steps = max(1, min(most, step + int(max(0.0, cfg.minutes * 60 - used_s) / rate_s)))
    while not _fits(steps, cfg) or decay_start(steps, cfg) < step:  # too late to end that soon
        steps += 1
    return steps, decay_start(steps, cfg) <= step


class StepBudget:
    """The clock and the plan of a run with `minutes` (see the module's note). `state()` goes into each
    checkpoint; `StepBudget(cfg, step, saved)` takes it back on resume."""

    def __init__(self, cfg: TrainConfig, step: int, saved: dict | None = None):
        saved = saved or {}
        self.most = saved.get("most", cfg.steps)  # the --steps the run was started with
        self.used = saved.get("used_s", 0.0)  # seconds of the budget spent before this process
        self.fixed = saved.get("fixed", False)
        self.started, self.first = CLOCK(), step
        self.told = False  # whether the fixed plan was announced

    def replan(self, cfg: TrainConfig, step: int, world: int = 1) -> int | None:
        """After `step` steps: the new step count, or None to keep the one planned (fixed, too few steps
        timed yet, or the decay of the plan begun: a resumed run times steps anew). Collective until that
        decay begins: every rank takes rank 0's plan (their clocks differ; their step counts must not)."""
        if decay_start(cfg.steps, cfg) <= step:  # the plan's decay has begun: final, alike on every rank
            self.fixed = True
            return None
        steps = None
        if not self.fixed and step - self.first >= MEASURE:
            now = CLOCK()
            rate = (now - self.started) / (step - self.first)
            steps, self.fixed = plan(cfg, step, self.used + now - self.started, rate, self.most)
        if world > 1:
            t = torch.tensor([steps or 0])
            dist.broadcast(t, 0)
            steps = t.item() or None
        return steps

    def state(self) -> dict:
        return {"most": self.most, "used_s": self.used + CLOCK() - self.started, "fixed": self.fixed}
