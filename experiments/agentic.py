"""Issue 9's chain end to end on this machine: evaluate a checkpoint on held-out tool tasks, synthesise
oracle trajectories, SFT the checkpoint on them, evaluate again on the same tasks.

    .venv/bin/python experiments/agentic.py all [--checkpoint DIR] [--worlds bank,shop] [--n 30] [--steps N]
    .venv/bin/python experiments/agentic.py eval --checkpoint DIR [--worlds bank,shop] [--strict-tools]
    .venv/bin/python experiments/agentic.py probe --checkpoint DIR [DIR ...]   # in-context copying

SFT extends k2-mini's 1,024-token window to `--context` (2,048 by default: a rendered conversation with
its task's toolset takes 440-2,060 tokens). Held-out tasks are the library's (`evaluate.held_out`,
split seed 0), filtered to `--worlds` (the domain split: the held-out domain, weather); training data
is drawn from the train part of the combo split (so no unseen-combination test task is in it) and
never from the held-out domain. Tables go to stdout, JSON and logs under --out.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from openk2.agent.runtime import Budget
from openk2.envs.evaluate import report, table, evaluate
from openk2.envs.spec import domain_names
from openk2.envs.splits import SPLITS, held_out, held_out_domains, in_distribution

PY = sys.executable
MAIN_CKPT = "/work/main/runs/k2-mini/checkpoints/step_000200"
TRAIN_WORLDS = "bank,calendar,shop,files,units"  # held-out tasks' worlds (weather: the unseen domain)


def load_text():
    return open("/proc/loadavg").read().split()[0]


def eval_tasks(splits, n, worlds, trained_on="combo"):
    """The first n test tasks of each split whose domain is in `worlds` (the domain split: its held-out
    domain, in no training world). Tasks are drawn from `worlds` and the held-out domain only, so a
    domain added for training alone leaves the held-out tasks as they were. The seed (and args) split's
    tasks are also in the train part of `trained_on` (the recipe's data is the combo split's train
    part), so none is a combination the training never saw (`splits.held_out`)."""
    groups, pool_worlds = {}, sorted(set(worlds) | set(held_out_domains(domain_names())))
    for by in splits:
        pool = held_out(by, "test", 40 * n, worlds=pool_worlds, trained_on=in_distribution(by, trained_on))
        groups[(by, "test")] = [t for t in pool if by == "domain" or t.domain in worlds][:n]
    return groups


def run_eval(ckpt, splits, n, worlds, out: Path, concurrency=8, strict_tools=False, trained_on="combo"):
    from openk2.agent.cli import in_process_client
    from openk2.cli import _load, _tokenizer
    groups = eval_tasks(splits, n, worlds, trained_on)
    tasks = list({t.id: t for ts in groups.values() for t in ts}.values())
    args = argparse.Namespace(path=str(ckpt), quantize=None, compile=False, strict_tools=strict_tools)
    start, load0 = time.monotonic(), load_text()
    client, stop = in_process_client(lambda: (_load(str(ckpt), None, 0), _tokenizer(str(ckpt))), args,
                                     sequences=concurrency)
    try:
        results = asyncio.run(evaluate(tasks, lambda task: client,
                                       Budget(max_turns=16, max_tokens=4096, turn_tokens=256), 0.0, concurrency))
    finally:
        stop.set()
    by_id = {r["id"]: r for r in results}
    rows = report({g: [by_id[t.id] for t in ts] for g, ts in groups.items()})
    seconds = time.monotonic() - start
    print(table(rows))
    print(f"eval {ckpt}: {len(tasks)} tasks in {seconds:.1f} s (load {load0} -> {load_text()})", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(ckpt), "worlds": worlds, "trained_on": trained_on,
                               "seconds": seconds, "rows": rows,
                               "tasks": results}, indent=1, default=str))
    return rows


def copy_probe(ckpt, n: int = 8, length: int = 40, seed: int = 0) -> tuple[float, float]:
    """In-context copying, the skill arguments need: mean nats/token over n random token sequences
    (ids from the whole vocabulary, special ones excepted) shown twice in a row, on the first showing
    and on the repeat. A model that copies predicts the repeat (~0 nats); one that does not pays the
    same on both."""
    import torch
    import torch.nn.functional as F

    from openk2.checkpoint import load_hf
    model = load_hf(ckpt, dtype=torch.float32, progress=False).eval()
    V = model.cfg.vocab_size
    r = torch.randint(100, min(model.cfg.bos_token_id or V, V) - 100, (n, length),
                      generator=torch.Generator().manual_seed(seed))
    x = torch.cat([r, r], 1)
    with torch.no_grad():
        nats = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    nats = nats.view(n, -1)
    return nats[:, :length - 1].mean().item(), nats[:, length:].mean().item()


def timed(cmd, log: Path):
    start, load0 = time.monotonic(), load_text()
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    print(f"  {seconds:.1f} s (load {load0} -> {load_text()}); log {log}", flush=True)
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "eval", "probe"])
    p.add_argument("more", nargs="*", help="probe: further checkpoints")
    p.add_argument("--checkpoint", default=MAIN_CKPT)
    p.add_argument("--out", default="runs/agentic")
    p.add_argument("--worlds", default=TRAIN_WORLDS, help="synthesis worlds")
    p.add_argument("--splits", default="seed,combo,domain")
    p.add_argument("--n", type=int, default=30, help="tasks per split")
    p.add_argument("--synth-n", type=int, default=2000)
    p.add_argument("--no-before", action="store_true", help="skip the evaluation before SFT")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--context", type=int, default=2048, help="SFT extends the window to this (0: keep it)")
    p.add_argument("--optimizer", default="muonclip")
    p.add_argument("--teacher-slips", type=float, default=0.2, help="share of teacher episodes that go wrong once")
    p.add_argument("--keep-failed", action="store_true", help="ablation: no judge filtering")
    p.add_argument("--no-failures", action="store_true", help="ablation: no injected tool failures")
    p.add_argument("--data", help="reuse this synthesised JSONL instead of synthesising")
    p.add_argument("--strict-tools", action="store_true", help="eval: calls held to the tools' schemas by the grammar")
    p.add_argument("--trained-on", default="combo", choices=[*SPLITS, "none"],
                   help="eval: the split whose train part the SFT data came from; seed and args tasks come "
                        "from it too (default: combo, the recipe's; none: every seed test task)")
    a = p.parse_args()
    trained_on = None if a.trained_on == "none" else a.trained_on
    out, splits, eval_worlds = Path(a.out), a.splits.split(","), a.worlds.split(",")
    assert all(s in SPLITS for s in splits), splits
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "probe":
        for ckpt in [a.checkpoint, *a.more]:
            first, repeat = copy_probe(ckpt)
            print(f"copy probe {ckpt}: {first:.2f} nats/token on first showing, {repeat:.2f} on the repeat")
        return
    if a.what == "eval":
        suffix = "_strict" * a.strict_tools
        suffix += "" if a.trained_on == "combo" else f"_{a.trained_on}"
        run_eval(a.checkpoint, splits, a.n, eval_worlds, out / f"eval_{Path(a.checkpoint).name}{suffix}.json",
                 strict_tools=a.strict_tools, trained_on=trained_on)
        return
    times = {}
    if not a.no_before:
        t = time.monotonic()
        run_eval(a.checkpoint, splits, a.n, eval_worlds, out / "eval_before.json", trained_on=trained_on)
        times["eval before"] = time.monotonic() - t
    data = Path(a.data) if a.data else out / "agentic.jsonl"
    if not a.data:
        flags = ["--teacher-slips", str(a.teacher_slips)] + ["--keep-failed"] * a.keep_failed + \
            ["--no-failures"] * a.no_failures
        times["synth"] = timed([PY, "-m", "openk2.cli", "synth", "--worlds", a.worlds, "--split", "combo", "--part",
                                "train", "--n", str(a.synth_n), "--seed", "1", "--out", str(data), *flags],
                               out / "synth.log")
    sft_dir = out / "sft"
    times["sft"] = timed([PY, "-m", "openk2.cli", "sft", a.checkpoint, "--data", str(data), "--out-dir", str(sft_dir),
                          "--seq-len", str(a.seq_len), "--context", str(a.context), "--optimizer", a.optimizer,
                          "--long", "drop", "--steps", str(a.steps), "--batch-size",
                          str(a.batch_size), "--lr", str(a.lr), "--eval-every", str(a.steps), "--eval-batches", "2",
                          "--ckpt-every", str(a.steps), "--log-every", "5", "--no-resume"], out / "sft.log")
    t = time.monotonic()
    latest = sft_dir / "checkpoints" / (sft_dir / "checkpoints" / "latest").read_text().strip()
    run_eval(latest, splits, a.n, eval_worlds, out / "eval_after.json", trained_on=trained_on)
    times["eval after"] = time.monotonic() - t
    for name, ckpt in (("before", a.checkpoint), ("after", latest)):
        print(f"copy probe {name} SFT: %.2f nats/token on first showing, %.2f on the repeat" % copy_probe(ckpt))
    print("wall times:", {k: round(v, 1) for k, v in times.items()},
          f"synth + SFT {times.get('synth', 0) + times['sft']:.0f} s")


if __name__ == "__main__":
    main()
