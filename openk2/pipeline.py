"""`openk2 pipeline`: the whole K2 recipe on the embedded defaults, one stage after another —
pretraining (MuonClip on the stdlib corpus) → agentic data synthesis (the programmatic teacher on the
tool worlds and on worlds of two domains each, judged by the rubrics, plus copy drills) → SFT on it →
RL on the tool worlds → evaluation — each stage's checkpoint evaluated on the same held-out tasks (the
seed and combo splits of the training worlds, and the unseen domain), ending in one table and the
commands to serve or run the result.

Every stage is the library's own command in this process (`train`, `synthesize`, `sft`, `rl`), its
output under `--out-dir` (pretrain/, agentic.jsonl, sft/, rl/, results.json), and a stage already
complete there is not run again: an interrupted pipeline continues where it stopped.
`--preset tiny` runs the whole chain in seconds (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from openk2.train.config import add_config_flags, config_from

SPLITS = ("seed", "combo", "domain")
DATA_SPLIT = "combo"  # SFT's and RL's tasks come from this split's train part; its test part stays unseen


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    model: str = "k2-mini"  # the preset pretrained
    data: str | None = None  # the pretraining corpus; None: the Python standard library's source
    pretrain_steps: int = 1000  # 200 (`openk2 train`'s) left SFT at 0–10 % success; 1,000 at 50 % (README)
    synth_n: int = 2000  # tool-world tasks the teacher solves (the judge keeps what passes)
    synth_drills: int = 6000  # copy drills added to the SFT data (envs/drills.py)
    synth_sum_drills: int = 0  # sums worked column by column (envs/drills.py); 2,000 cost at 300 SFT steps (README)
    synth_mixed_n: int = 700  # more tasks, in worlds of two domains each ("bank+shop"): one request, two domains' tools
    sft_steps: int = 300
    sft_lr: float = 3e-3
    context: int = 2048  # SFT extends the pretrained window to this (tool declarations are long)
    rl_steps: int = 12
    rl_kinds: str = ""  # the task family RL trains on ("": every kind)
    eval_n: int = 30  # held-out tasks per split
    worlds: str = "bank,calendar,shop,files,units"  # training worlds (the unseen domain is held out)
    threads: int = 0  # 0: torch's default


PIPELINE_PRESETS = {"demo": PipelineConfig()}
PIPELINE_PRESETS["tiny"] = dataclasses.replace(  # tests: the chain in seconds, nothing learned
    PIPELINE_PRESETS["demo"], out_dir="runs/pipeline-tiny", model="k2-tiny", pretrain_steps=4, synth_n=6,
    sft_steps=3, context=4096, rl_steps=1, eval_n=1, worlds="units", synth_drills=4,
    synth_sum_drills=2)


def say(text: str) -> None:
    print(f"[openk2 pipeline] {text}", file=sys.stderr, flush=True)


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def eval_tasks(cfg: PipelineConfig) -> dict[str, list]:
    from openk2.envs.splits import held_out, in_distribution
    worlds = cfg.worlds.split(",")
    return {by: held_out(by, "test", cfg.eval_n, worlds=None if by == "domain" else worlds,
                         trained_on=in_distribution(by, DATA_SPLIT)) for by in SPLITS}


def evaluate_checkpoint(folder: Path, tasks: dict[str, list], concurrency: int = 16) -> dict[str, dict]:
    """Each split's summary (envs/evaluate.summarize) of greedy episodes of the checkpoint, in process."""
    import torch

    from openk2.agent.client import EngineClient
    from openk2.checkpoint import load_hf
    from openk2.rl.loop import engine_of, evaluate_groups

    model = load_hf(folder, dtype=torch.float32, progress=False).eval()
    _, loop, fmt = engine_of(model, folder, concurrency)
    return evaluate_groups(loop, EngineClient(loop, fmt), tasks, concurrency)


def table(scores: dict[str, dict[str, dict]]) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"
    lines = ["| after | split | tasks | success % | format % | tool % | args % | turns |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for stage, splits in scores.items():
        for by, s in splits.items():
            shares = " | ".join(pct(s[k]) for k in ("success", "format_validity", "tool_name", "arguments"))
            turns = "–" if s["mean_turns"] is None else f"{s['mean_turns']:.2f}"
            lines.append(f"| {stage} | {by} | {s['tasks']} | {shares} | {turns} |")
    return "\n".join(lines)


def pipeline(cfg: PipelineConfig) -> dict:
    """Run (or continue) every stage; returns {stage: {split: summary}} and writes results.json."""
    import torch

    from openk2.agent.episode import write_jsonl
    from openk2.envs.drills import drills, sum_drills
    from openk2.envs.synth import MIXED_KINDS, pairs, pick_tasks, synthesize
    from openk2.rl.config import RL_DEFAULTS, RL_RECIPE, RLConfig
    from openk2.rl.loop import rl
    from openk2.train import TRAIN_PRESETS, train
    from openk2.train.sft import SFT_DEFAULTS, SFTConfig, sft

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started, out, tasks, worlds = time.monotonic(), Path(cfg.out_dir), eval_tasks(cfg), cfg.worlds.split(",")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    scores, times = json.loads(results.read_text()) if results.exists() else {}, {}

    def stage(name: str, run) -> Path:
        start = time.monotonic()
        say(f"{name} …")
        folder = run()
        times[name] = time.monotonic() - start
        if name not in scores:
            scores[name] = evaluate_checkpoint(folder, tasks)
            results.write_text(json.dumps(scores, indent=1))
        say(f"{name}: {times[name]:.0f} s; held-out success "
            + ", ".join(f"{by} {100 * s['success']:.1f} %" for by, s in scores[name].items()))
        return folder

    base = dataclasses.replace(TRAIN_PRESETS["tiny" if cfg.model == "k2-tiny" else "demo"], model=cfg.model,
                               data=cfg.data, steps=cfg.pretrain_steps, out_dir=str(out / "pretrain"), resume=True,
                               threads=cfg.threads)
    if cfg.model == "k2-tiny":
        base = dataclasses.replace(base, warmup_steps=1, ckpt_every=cfg.pretrain_steps)
    pretrained = stage("pretrain", lambda: (train(base), latest(out / "pretrain"))[1])
    data = out / "agentic.jsonl"

    def make_data():
        if not data.exists() or not data.stat().st_size:
            picked = pick_tasks(cfg.synth_n, 1, worlds, None, DATA_SPLIT, "train")
            if cfg.synth_mixed_n and len(worlds) > 1:
                picked += pick_tasks(cfg.synth_mixed_n, 2, pairs(worlds), list(MIXED_KINDS), DATA_SPLIT, "train")
            kept = [r for r in synthesize(picked, 1, slips=0.2) if r["meta"]["passed"]]
            data.with_suffix(".tmp").unlink(missing_ok=True)  # (write_jsonl appends)
            extra = drills(cfg.synth_drills, 1) + sum_drills(cfg.synth_sum_drills, 1)
            write_jsonl(data.with_suffix(".tmp"), kept + extra)
            data.with_suffix(".tmp").replace(data)
        return data

    make_data()
    sft_cfg = SFTConfig(**{**SFT_DEFAULTS, "checkpoint": str(pretrained), "model": str(pretrained), "data": str(data),
                           "out_dir": str(out / "sft"), "seq_len": cfg.context, "context": cfg.context, "long": "drop",
                           "steps": cfg.sft_steps, "batch_size": 4, "lr": cfg.sft_lr, "eval_every": cfg.sft_steps,
                           "ckpt_every": cfg.sft_steps, "warmup_steps": min(10, cfg.sft_steps // 3),
                           "resume": True, "threads": cfg.threads})
    tuned = stage("sft", lambda: (sft(sft_cfg), latest(out / "sft"))[1])
    rl_cfg = RLConfig(**{**RL_DEFAULTS, **RL_RECIPE, "checkpoint": str(tuned), "model": str(tuned),
                         "out_dir": str(out / "rl"), "steps": cfg.rl_steps, "kinds": cfg.rl_kinds, "worlds": cfg.worlds,
                         "split": DATA_SPLIT,
                         "ptx_data": str(data), "eval_every": cfg.rl_steps, "ckpt_every": cfg.rl_steps,
                         "eval_tasks": cfg.eval_n, "resume": True, "threads": cfg.threads, "seq_len": 4096})
    final = stage("rl", lambda: (rl(rl_cfg), latest(out / "rl"))[1])
    print(table(scores))
    print(f"\nthe result: {final}\n  serve it:  .venv/bin/openk2 serve {final}\n"
          f"  an agent:  .venv/bin/openk2 agent {final} -p \"…\"\n  seconds per stage in this run (a stage "
          "already complete takes ~0): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; {time.monotonic() - started:.0f} s in all, evaluations included")
    return scores


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="openk2 pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PIPELINE_PRESETS))
    add_config_flags(p, PipelineConfig)
    args = vars(p.parse_args(argv))
    return pipeline(config_from(p, PIPELINE_PRESETS[args.pop("preset")], args))
