"""RLConfig: `openk2 rl CHECKPOINT` — every field a `--flag`; the training fields are TrainConfig's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from openk2.envs.splits import SPLITS
from openk2.envs.tasks import KINDS
from openk2.rl.rewards import parse_budgets
from openk2.sampling import RL_RECIPE_TEMPERATURE, RL_RECIPE_TEMPERATURE_END, RL_TEMPERATURE, RL_TEMPERATURE_END
from openk2.train.config import TrainConfig, add_config_flags

ALGOS = ("k15", "grpo")


@dataclass(frozen=True)
class RLConfig(TrainConfig):
    checkpoint: str = ""  # the HF folder to improve (an SFT checkpoint): weights, tokenizer, chat template
    algo: str = "k15"  # k15 (K2's objective) | grpo
    samples: int = 4  # K: episodes per task, one group
    tau: float = 0.1  # K1.5's τ on the log-ratio to the rollout policy
    clip: float = 0.2  # GRPO's ratio clip ε
    kl_coef: float = 0.0  # GRPO's β on k3 KL to the rollout policy; 0: off
    updates: int = 1  # optimiser steps per rollout batch
    temperature: float = RL_TEMPERATURE  # sampling temperature at the first step ...
    temperature_end: float = RL_TEMPERATURE_END  # ... decayed (cosine) to this by the last; equal: no decay
    budget: int = 512  # generated tokens per episode, all turns (budget control) ...
    budgets: str = ""  # ... per task kind where given: "chain=384,multi_turn=640"
    budget_penalty: float = 0.5  # reward lost by an episode cut at its budget; 0: truncation only
    partial: float = 0.0  # reward of a failed episode per share of the plan's calls made right; 0: success only
    format_penalty: float = 0.0  # reward lost per share of unreadable or undeclared calls
    critic: str = "none"  # self-critique rubric reward: none | self (the policy) | an OpenAI-compatible URL
    critic_weight: float = 0.0  # its weight beside the verifiable reward
    ptx_data: str = ""  # PTX: chat JSONL (e.g. the SFT data) whose LM loss is added; "": off
    ptx_weight: float = 0.1  # its weight
    ptx_batch: int = 1  # its rows of seq_len per step
    split: str = "seed"  # tasks from this split's train part; held-out evaluation on its test part
    kinds: str = ""  # task kinds, comma-separated ("": all): the family RL trains on
    worlds: str = ""  # tool worlds, comma-separated ("": all)
    pool: int = 400  # training tasks to draw from
    eval_tasks: int = 30  # held-out tasks per evaluation (test part; every kind of the worlds)
    max_turns: int = 8  # model calls per episode
    concurrency: int = 16  # episodes at once (the engine's batch)

    TRAJECTORY = TrainConfig.TRAJECTORY + ("checkpoint", "algo", "samples", "tau", "clip", "kl_coef", "updates",
                                           "temperature", "temperature_end", "budget", "budgets", "split", "kinds",
                                           "worlds", "ptx_data", "ptx_weight", "ptx_batch", "pool", "partial",
                                           "budget_penalty", "format_penalty", "critic", "critic_weight",
                                           "max_turns")

    def __post_init__(self):
        super().__post_init__()
        if self.fsdp or self.sharded_checkpoints or self.ep > 1:
            raise ValueError("openk2 rl runs in one process and writes Hugging Face checkpoints: --fsdp, --ep and "
                             "--checkpoint-format dcp are `openk2 train`'s and `openk2 sft`'s")
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"{self.checkpoint or '(none)'}: not a Hugging Face model folder (no config.json)")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, not {self.algo!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if bad := [k for k in self.kind_list or [] if k not in KINDS]:
            raise ValueError(f"unknown task kinds {bad}; the kinds are: {', '.join(KINDS)}")
        if self.critic != "none" and not self.critic_weight:
            raise ValueError("--critic needs --critic-weight > 0 (its reward's weight)")
        for name in ("samples", "updates", "max_turns", "concurrency", "pool", "eval_tasks", "budget", "ptx_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.tau, self.clip, self.kl_coef, self.temperature, self.temperature_end, self.budget_penalty,
               self.ptx_weight, self.critic_weight) < 0:
            raise ValueError("tau, clip, kl_coef, temperatures, penalties and weights must be >= 0")
        parse_budgets(self.budgets, self.budget)  # a bad entry fails here, before any work

    @property
    def kind_list(self) -> list[str] | None:
        return [k.strip() for k in self.kinds.split(",") if k.strip()] or None

    @property
    def world_list(self) -> list[str] | None:
        return [w.strip() for w in self.worlds.split(",") if w.strip()] or None

    def temperature_at(self, step: int) -> float:
        """Cosine from `temperature` at step 0 to `temperature_end` at the last step."""
        frac = step / max(1, self.steps - 1)
        return self.temperature_end + (self.temperature - self.temperature_end) * 0.5 * (1 + math.cos(math.pi * frac))

    def model_config(self):
        from openk2.config import ModelConfig
        return ModelConfig.from_json(Path(self.checkpoint))


# RL defaults: few, expensive steps (each samples batch_size × samples episodes); a low, flat lr
RL_DEFAULTS = dict(out_dir="runs/rl", seq_len=4096, batch_size=8, steps=20, lr=3e-4, warmup_steps=0,
                   decay_frac=0.0, final_lr_frac=1.0, eval_every=10, log_every=1, ckpt_every=10, bias_update_speed=0.0)
# the recipe measured in the README ("RL": recovery lifted 12.5 → 35 %), used by experiments/rl.py and the pipeline
RL_RECIPE = dict(lr=2e-4, samples=8, partial=0.3, budget=320, ptx_weight=0.5, temperature=RL_RECIPE_TEMPERATURE,
                 temperature_end=RL_RECIPE_TEMPERATURE_END, concurrency=64)
SKIP = ("checkpoint", "model", "data", "tokenizer", "grad_accum", "val_fraction", "eval_batches", "seq_aux_weight",
        "minutes")  # RL steps are rollouts: its loop takes no time budget


def parse_rl_args(argv=None, prog: str = "openk2 rl") -> RLConfig:
    import argparse
    p = argparse.ArgumentParser(prog=prog, description="Improve a K2 checkpoint with RL on the tool worlds: K "
                                "episodes per task on the in-process engine, verifiable rewards, K2's objective.")
    p.add_argument("checkpoint", help="Hugging Face folder (an SFT checkpoint; its tokenizer and chat template)")
    add_config_flags(p, RLConfig, skip=SKIP, defaults=RL_DEFAULTS,
                     notes={"seq_len": "ids per training forward (whole samples; a longer one alone)",
                            "batch_size": "tasks per step (each sampled `samples` times)"})
    args = vars(p.parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None}
    try:
        return RLConfig(**{**RL_DEFAULTS, **given, "model": args["checkpoint"]})
    except ValueError as e:
        p.error(str(e))
