"""Three toy-scale MuonClip experiments on the embedded corpus, each a few short training runs:

  qk-clip   vanilla Muon at a high learning rate vs MuonClip with a small τ: max attention logit
            per step (K2 report Fig. 2 at toy scale) and the losses
  optim     Muon vs AdamW at equal tokens: validation loss
  balance   expert load max/mean with and without aux-loss-free bias balancing

    .venv/bin/python experiments/muonclip.py [qk-clip|optim|balance|all] [--steps N]

Prints a markdown table per experiment and writes PNGs to experiments/results/.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from openk2.train import TRAIN_PRESETS, train

OUT = Path(__file__).parent / "results"
BASE = dataclasses.replace(TRAIN_PRESETS["demo"], model="k2-tiny", seq_len=128, batch_size=8, warmup_steps=10,
                           eval_every=1000, eval_batches=8, log_every=1, ckpt_every=10**6, lr=3e-3)


def run(name: str, **overrides) -> list[dict]:
    cfg = dataclasses.replace(BASE, out_dir=str(OUT / "runs" / name), **overrides)
    (Path(cfg.out_dir) / "metrics.jsonl").unlink(missing_ok=True)
    train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r]


def _plot(path: Path, series: dict[str, tuple[list, list]], ylabel: str, hline: float | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    if hline:
        ax.axhline(hline, color="gray", linestyle="--", label=f"τ = {hline:g}")
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def qk_clip(steps: int, lr: float = 3e-2, tau: float = 8.0):
    vanilla = run("qk-vanilla", steps=steps, lr=lr, qk_clip_tau=0.0)
    clipped = run("qk-clip", steps=steps, lr=lr, qk_clip_tau=tau)
    series = {name: ([r["step"] for r in rows], [max(r["max_logit"]) for r in rows])
              for name, rows in (("Muon", vanilla), (f"MuonClip τ={tau:g}", clipped))}
    _plot(OUT / "qk_clip_max_logit.png", series, "max attention logit (all layers)", tau)
    print(f"\n### QK-Clip (k2-tiny, lr {lr:g}, {steps} steps)\n")
    print("| run | max logit, final | max logit, peak | heads clipped (sum) | train loss, last 10 | val loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, rows in (("Muon", vanilla), (f"MuonClip τ={tau:g}", clipped)):
        peak = max(max(r["max_logit"]) for r in rows)
        last = sum(r["loss"] for r in rows[-10:]) / 10
        print(f"| {name} | {max(rows[-1]['max_logit']):.1f} | {peak:.1f} | "
              f"{sum(r['qk_clipped_heads'] for r in rows)} | {last:.3f} | {rows[-1]['val_loss']:.3f} |")


def optim(steps: int, lrs=(1e-3, 3e-3, 1e-2)):
    """Each optimizer at three peak learning rates (same WSD shape), so neither is judged off its best."""
    rows = {(name, lr): run(f"optim-{name}-{lr:g}", steps=steps, optimizer=name, lr=lr)
            for name in ("muonclip", "adamw") for lr in lrs}
    best = {name: min((rs[-1]["val_loss"], lr) for (n, lr), rs in rows.items() if n == name)
            for name in ("muonclip", "adamw")}
    _plot(OUT / "muon_vs_adamw.png", {f"{n} lr {best[n][1]:g}": ([r["step"] for r in rows[n, best[n][1]]],
                                                                  [r["loss"] for r in rows[n, best[n][1]]])
                                       for n in best}, "train loss")
    tokens = steps * BASE.batch_size * BASE.seq_len
    print(f"\n### Muon vs AdamW (k2-tiny, {steps} steps = {tokens:,} tokens each, WSD schedule)\n")
    print("| optimizer | " + " | ".join(f"val loss, lr {lr:g}" for lr in lrs) + " |")
    print("| --- |" + " ---: |" * len(lrs))
    for name in ("muonclip", "adamw"):
        print(f"| {name} | " + " | ".join(f"{rows[name, lr][-1]['val_loss']:.3f}" for lr in lrs) + " |")


def balance(steps: int):
    rows = {f"bias balancing (γ={BASE.bias_update_speed:g})": run("balance-on", steps=steps),
            "none": run("balance-off", steps=steps, bias_update_speed=0.0)}
    series = {}
    for name, rs in rows.items():
        series[name] = ([r["step"] for r in rs],
                        [max(r["expert_load_max_over_mean"].values()) for r in rs])
    _plot(OUT / "expert_load_balance.png", series, "expert load max/mean (worst layer)")
    print(f"\n### Expert load with and without balancing (k2-tiny, {steps} steps)\n")
    print("| run | max/mean, last 10 steps (mean over layers) | worst layer | val loss |\n| --- | ---: | ---: | ---: |")
    for name, rs in rows.items():
        per_step = [sum(r["expert_load_max_over_mean"].values()) / len(r["expert_load_max_over_mean"])
                    for r in rs[-10:]]
        worst = max(max(r["expert_load_max_over_mean"].values()) for r in rs[-10:])
        print(f"| {name} | {sum(per_step) / len(per_step):.2f} | {worst:.2f} | {rs[-1]['val_loss']:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", default="all", choices=["qk-clip", "optim", "balance", "all"])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in (("qk-clip", qk_clip), ("optim", optim), ("balance", balance)):
        if args.which in (name, "all"):
            fn(args.steps)


if __name__ == "__main__":
    main()
