"""`openk2 plot RUN_DIR`: PNGs of a run's metrics.jsonl — loss (train and validation; for SFT also the
share of loss tokens), max attention logit per layer (what QK-Clip bounds), and expert load per MoE
layer as a heat map over steps; for an RL run (`openk2 rl`), reward, success and response length per
step with the held-out success, instead of the loss."""

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a training run folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r]


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, rows = Path(run_dir), read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step records yet")
    if any("reward_mean" in r for r in rows):
        written = [_plot_rl(plt, run_dir, rows)]
        rows = [r for r in rows if "reward_mean" in r]
    else:
        written = [_plot_loss(plt, run_dir, rows)]
    return written + _plot_logits_and_load(plt, run_dir, rows)


def eval_success_keys(rows: list[dict]) -> list[str]:
    """An RL run's held-out success series (`eval_<group>_success`), in order."""
    return sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_success")})


def _plot_rl(plt, run_dir: Path, rows: list[dict]) -> Path:
    """rl.png: reward and success of the rollouts, held-out success (dots); response length beside."""
    train = [r for r in rows if "reward_mean" in r]
    fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward_mean"] for r in train], label="reward (mean)")
    ax.plot(steps, [r["success"] for r in train], label="rollout success")
    for key in eval_success_keys(rows):
        seen = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot(*zip(*seen), "o-", label=f"held-out success ({key[5:-8]})")
    ax.set(xlabel="step", title=f"{run_dir.name}: reward and success")
    ax.legend(fontsize=7)
    right.plot(steps, [r["response_tokens"] for r in train], label="tokens per episode")
    right.set(xlabel="step", ylabel="generated tokens per episode", title="response length")
    twin = right.twinx()
    twin.plot(steps, [r["truncation_rate"] for r in train], ":", color="gray")
    twin.set(ylabel="truncated share (dotted)", ylim=(0, 1))
    return _save(fig, run_dir / "rl.png")


def _plot_loss(plt, run_dir: Path, rows: list[dict]) -> Path:
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
    ax.legend()
    share = [r.get("loss_token_share", 1.0) for r in rows]
    if min(share) < 1:  # SFT: the share of positions whose token is learned (assistant tokens)
        twin = ax.twinx()
        twin.plot(steps, share, ":", color="gray")
        twin.set(ylabel="loss-token share (dotted)", ylim=(0, 1))
    return _save(fig, run_dir / "loss.png")


def _plot_logits_and_load(plt, run_dir: Path, rows: list[dict]) -> list[Path]:
    written = []
    if any("max_logit" in r for r in rows):
        fig, ax = plt.subplots(figsize=(7, 4))
        logit_rows = [r for r in rows if "max_logit" in r]
        for layer in range(len(logit_rows[0]["max_logit"])):
            ax.plot([r["step"] for r in logit_rows], [r["max_logit"][layer] for r in logit_rows],
                    label=f"layer {layer}")
        ax.set(xlabel="step", ylabel="max pre-softmax logit", title="max attention logit per layer")
        ax.legend(fontsize=7)
        written.append(_save(fig, run_dir / "max_logit.png"))

    load_rows = [r for r in rows if r.get("expert_load")]
    if load_rows:
        layers = sorted(load_rows[0]["expert_load"], key=int)
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 2.2 * len(layers)), squeeze=False)
        for ax, layer in zip(axes[:, 0], layers):
            grid = [r["expert_load"][layer] for r in load_rows]  # steps × experts, load / mean
            im = ax.imshow(list(zip(*grid)), aspect="auto", cmap="magma", vmin=0,
                           extent=(load_rows[0]["step"], load_rows[-1]["step"], len(grid[0]), 0))
            ax.set(ylabel=f"layer {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="load / mean")
        axes[-1, 0].set_xlabel("step")
        written.append(_save(fig, run_dir / "expert_load.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
