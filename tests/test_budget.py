"""`--minutes`: the step count fitted to a wall-clock budget, on a clock the tests drive (one second a step)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from openk2.checkpoint import latest_checkpoint, load_hf
from openk2.train import TRAIN_PRESETS, loop, train
from openk2.train import budget as budget_mod
from openk2.train.budget import decay_start, plan

from test_train import corpus, _cfg  # noqa: F401 (a fixture)

CFG = dataclasses.replace(TRAIN_PRESETS["tiny"], steps=100, warmup_steps=2, decay_frac=0.3, minutes=0.5)


def test_the_plan_fits_the_time_left_within_the_bound():
    assert decay_start(25, CFG) == 18  # 7 decay steps: the peak through step 17
    assert plan(CFG, 10, used_s=10.0, rate_s=1.0, most=100) == (30, False)  # 20 s left: 20 more steps
    assert plan(CFG, 10, used_s=10.0, rate_s=2.0, most=100) == (20, False)
    assert plan(CFG, 10, used_s=10.0, rate_s=1.0, most=24) == (24, False)  # --steps bounds it
    assert plan(CFG, 10, used_s=10.0, rate_s=0.1, most=100) == (100, False)


@pytest.mark.parametrize("decay_frac", [0.0, 0.01, 0.3])
def test_the_decay_starts_where_the_schedule_leaves_its_peak(decay_frac):
    for steps in (5, 17, 100, 301):
        cfg = dataclasses.replace(CFG, steps=steps, decay_frac=decay_frac)
        below = [s for s in range(cfg.warmup_steps, steps) if loop.lr_at(cfg, s) < cfg.lr]  # past the warm-up
        assert decay_start(steps, cfg) == below[0]


def test_with_no_decay_the_last_step_is_the_first_below_the_peak():
    cfg = dataclasses.replace(CFG, decay_frac=0.0)
    steps, fixed = plan(cfg, 20, used_s=40.0, rate_s=1.0, most=100)  # spent: one more step, at the final rate
    assert (steps, fixed) == (21, True) and loop.lr_at(dataclasses.replace(cfg, steps=21), 20) < cfg.lr
    assert plan(cfg, 3, used_s=0.0, rate_s=1.0, most=4) == (4, True)  # never past --steps; step 3 the last


def test_too_late_to_end_in_time_the_decay_starts_at_once():
    # 20 steps run at the peak, the budget spent: the shortest run whose decay starts at step 20
    steps, fixed = plan(CFG, 20, used_s=40.0, rate_s=1.0, most=100)
    assert (steps, fixed) == (28, True) and decay_start(steps, CFG) == 20 and decay_start(steps - 1, CFG) < 20
    steps, fixed = plan(CFG, 3, used_s=40.0, rate_s=1.0, most=100)  # never inside the warm-up
    assert decay_start(steps, CFG) >= CFG.warmup_steps + 1 and steps >= CFG.warmup_steps + 2


@pytest.fixture
def one_second_a_step(monkeypatch):
    """The budget's clock moves one second each time a step starts (its learning rate is looked up)."""
    now = [0.0]
    monkeypatch.setattr(budget_mod, "CLOCK", lambda: now[0])
    lr_at = loop.lr_at

    def ticking(cfg, step):
        now[0] += 1.0
        return lr_at(cfg, step)
    monkeypatch.setattr(loop, "lr_at", ticking)
    return now


def _steps(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def test_a_budgeted_run_is_the_run_of_the_steps_it_chose(corpus, tmp_path, one_second_a_step, capsys):  # noqa: F811
    """25 s at one second a step: 25 of at most 40 steps, the same weights and losses as `--steps 25`, the
    learning rate ending at its floor; the plan noted once."""
    budgeted = _cfg(corpus, tmp_path / "budget", steps=40, minutes=25 / 60, log_every=1)
    train(budgeted)
    rows = _steps(tmp_path / "budget")
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert {r["step"]: r["planned_steps"] for r in rows if "planned_steps" in r} == {s: 25 for s in range(10, 18)}
    assert "--minutes 0.416667: 25 steps fit (at most 40)" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "budget").name == "step_000025"
    train(_cfg(corpus, tmp_path / "fixed", steps=25, log_every=1))
    plain = _steps(tmp_path / "fixed")
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in plain]
    assert rows[-1]["lr"] == pytest.approx(budgeted.lr * budgeted.final_lr_frac)
    a, b = (load_hf(latest_checkpoint(tmp_path / d), progress=False).state_dict() for d in ("budget", "fixed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budgeted_run_resumes_with_its_plan_and_its_time(corpus, tmp_path, one_second_a_step):  # noqa: F811
    cfg = _cfg(corpus, tmp_path / "split", steps=40, minutes=25 / 60, log_every=1)
    train(cfg, stop_at=13)  # its last checkpoint: step 12, before the decay (from 18)
    state = torch.load(latest_checkpoint(tmp_path / "split") / "train_state.pt", weights_only=False)
    assert state["config"]["steps"] == 25 and state["budget"] == {"most": 40, "used_s": 12.0, "fixed": False}
    with pytest.raises(ValueError, match="minutes"):
        train(dataclasses.replace(cfg, resume=True, minutes=1.0))
    train(dataclasses.replace(cfg, resume=True))
    train(_cfg(corpus, tmp_path / "whole", steps=40, minutes=25 / 60, log_every=1))
    assert [r["loss"] for r in _steps(tmp_path / "split")] == [r["loss"] for r in _steps(tmp_path / "whole")]
    assert latest_checkpoint(tmp_path / "split").name == "step_000025"


def test_minutes_must_not_be_negative():
    with pytest.raises(ValueError, match="minutes must be >= 0"):
        dataclasses.replace(TRAIN_PRESETS["tiny"], minutes=-1)


def test_a_checkpoint_from_before_minutes_resumes(corpus, tmp_path):  # noqa: F811
    """A train_state written before the field existed reads as the default (off), not as a changed run."""
    cfg = _cfg(corpus, tmp_path / "old")
    train(cfg, stop_at=4)
    path = latest_checkpoint(tmp_path / "old") / "train_state.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["minutes"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="minutes: 0.0 -> 1.0"):  # the default, against the flag given now
        train(dataclasses.replace(cfg, resume=True, minutes=1.0))
    assert train(dataclasses.replace(cfg, resume=True))["step"] == cfg.steps
