"""RL on the tool worlds at equal budget: K2's objective (K1.5) and its ablations, from one SFT checkpoint.

  k15        K1.5 loss, budget control, temperature decay 0.8 -> 0.5, PTX     (the recipe)
  ptx-only   the same rollouts and PTX, τ = 0: no policy gradient             (control: is it RL?)
  grpo       GRPO instead of K1.5                                             (objective)
  no-budget  no per-episode token budget, no truncation penalty               (budget control)
  no-decay   sampling temperature held at 0.8                                 (temperature decay)

    .venv/bin/python experiments/rl.py CHECKPOINT --ptx-data SFT.jsonl [--runs k15,grpo,...] [--steps N]
    .venv/bin/python experiments/rl.py --report        # the table and plots of the runs already made

The default family is `recovery` (a tool call fails once, or returns one page of its results, and the
episode must call again), for a checkpoint fine-tuned on data synthesised with `--no-failures`: SFT never
showed it a failed call, so what it learns about them it learns here, from the reward (README, "RL").

Each run is `openk2 rl` with the same steps, tasks, samples and seed (runs in experiments/results/runs/rl-*).
Prints a markdown table (held-out success of the trained family and of the other kinds, first and last
evaluation; mean response tokens and truncation rate over the run; wall time) and writes
experiments/results/rl_success.png and rl_length.png.
"""

import argparse
import json
import time
from pathlib import Path

from openk2.rl.config import RL_RECIPE

OUT = Path(__file__).parent / "results"
RUNS = {"k15": [], "ptx-only": ["--tau", "0"], "grpo": ["--algo", "grpo"],
        "no-budget": ["--budget", "4096", "--budget-penalty", "0"],
        "no-decay": ["--temperature-end", str(RL_RECIPE["temperature"])]}


def run_dir(name: str) -> Path:
    return OUT / "runs" / f"rl-{name}"


def rows_of(name: str) -> list[dict]:
    path = run_dir(name) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "step" in r]


def run(name: str, checkpoint: str, common: list[str]) -> float:
    from openk2.rl.config import parse_rl_args
    from openk2.rl.loop import rl
    out = run_dir(name)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    cfg = parse_rl_args([checkpoint, "--out-dir", str(out), *common, *RUNS[name]])
    start = time.monotonic()
    rl(cfg)
    seconds = time.monotonic() - start
    (out / "wall_s.txt").write_text(f"{seconds:.0f}\n")
    return seconds


def report(names: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [n for n in names if rows_of(n)]
    print("| run | family success, start → end | other kinds, start → end | tokens / episode | truncated | wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in done:
        rows = rows_of(name)
        train = [r for r in rows if "reward_mean" in r]

        def ends(key):
            seen = [r[key] for r in rows if r.get(key) is not None]
            return f"{100 * seen[0]:.1f} → {100 * seen[-1]:.1f} %" if seen else "–"
        wall = run_dir(name) / "wall_s.txt"
        print(f"| {name} | {ends('eval_family_success')} | {ends('eval_other_success')} | "
              f"{sum(r['response_tokens'] for r in train) / len(train):.0f} | "
              f"{100 * sum(r['truncation_rate'] for r in train) / len(train):.1f} % | "
              f"{wall.read_text().strip() + ' s' if wall.exists() else '–'} |")
    for what, keys, path in (("held-out success", ("eval_family_success", "eval_other_success"), "rl_success.png"),
                             ("generated tokens per episode", ("response_tokens",), "rl_length.png")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, name in enumerate(done):  # one colour a run; the other kinds dashed
            for key in keys:
                seen = [(r["step"], r[key]) for r in rows_of(name) if r.get(key) is not None]
                label = name + ("" if len(keys) == 1 else f" ({key.split('_')[1]})")
                ax.plot(*zip(*seen), color=f"C{i}", marker="o" if len(keys) > 1 else None, label=label,
                        linestyle="--" if key.endswith("other_success") else "-")
        ax.set(xlabel="RL step", ylabel=what)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / path, dpi=110)
        plt.close(fig)
        print(f"wrote {OUT / path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="the SFT checkpoint RL starts from")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--report", action="store_true", help="only the table and plots of finished runs")
    p.add_argument("--ptx-data", default="", help="PTX conversations (the SFT data)")
    p.add_argument("--steps", default="20")
    p.add_argument("--kinds", default="recovery", help="the task family RL trains on")
    p.add_argument("--worlds", default="bank,calendar,shop,files,units")
    args, extra = p.parse_known_args()
    names = args.runs.split(",")
    if not args.report:
        if not args.checkpoint:
            p.error("give the SFT checkpoint (or --report)")
        recipe = [arg for k, v in RL_RECIPE.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
        common = ["--steps", args.steps, "--kinds", args.kinds, "--worlds", args.worlds, "--ptx-data", args.ptx_data,
                  "--batch-size", "8", "--eval-tasks", "40", "--eval-every", "5", "--ckpt-every", "1000", *recipe,
                  *extra]
        for name in names:
            print(f"[rl] {name}: {run(name, args.checkpoint, common):.0f} s", flush=True)
    report(names)


if __name__ == "__main__":
    main()
