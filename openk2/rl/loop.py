"""`openk2 rl CHECKPOINT`: K2's RL stage on the tool worlds, read top to bottom as the recipe.

Per step: `batch_size` training tasks (the split's train part, the chosen kinds), each run `samples`
times through the agent loop on the Engine in this process, sampled at the step's temperature
(cosine decay); each episode scored (`rewards.py`: the rubric, budget control, optionally the critic);
then `updates` optimiser steps (MuonClip, QK-Clip on the recorded max logits) on K2's objective
(`objective.py`), plus the PTX loss on chat data; then the engine decodes with the new weights.

Train and engine share one model in one process: the weights the optimiser updates in place are the
ones the next rollout decodes with, so the "sync" is the switch back to inference (eval mode, no
logit recording; no compiled graph holds a copy: they read the parameters), timed as `sync_s`
(tests/test_rl.py: engine log-probs after an update equal the trainer's). Checkpoints are HF folders
with the chat template plus `train_state.pt` (optimiser, task sampler, PTX loader, RNG): `--resume`
continues the run. Metrics go to metrics.jsonl: reward, success, length, truncation, log-ratio,
PTX loss, temperature, rollout/train/sync seconds, and the held-out evaluation every `eval_every`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from openk2.agent.client import EngineClient, OpenAIClient
from openk2.agent.runtime import Budget
from openk2.checkpoint import latest_checkpoint, load_hf, restore
from openk2.data.packing import PackedSFTLoader, fit_examples
from openk2.engine import Engine, EngineConfig
from openk2.envs.evaluate import evaluate, summarize
from openk2.envs.splits import held_out
from openk2.optim import apply_qk_clip
from openk2.rl.config import RLConfig, parse_rl_args
from openk2.rl.objective import advantages, grpo_loss, k15_loss, sample_weights
from openk2.rl.rollout import Sample, collect, micro_batches, policy_logprobs, rollout, rollout_metrics
from openk2.sampling import GREEDY
from openk2.server.chat_format import ChatFormat
from openk2.server.engine_loop import EngineLoop
from openk2.tokenizer import load_chat_template
from openk2.train.loop import _check_same_trajectory, build_optimizer, lr_at, save_checkpoint, target_loss
from openk2.train.runlog import final_metrics, git_revision, open_log
from openk2.train.sft import chat_tokenizer, encode_file


class TaskSampler:
    """Endless batches of training tasks: the pool in a fresh seeded order each epoch; resumable."""

    def __init__(self, tasks: list, seed: int):
        if not tasks:
            raise ValueError("no training tasks: check --split, --kinds and --worlds")
        self.tasks, self.seed, self.epoch, self.position = tasks, seed, 0, 0

    def next(self, n: int) -> list:
        out = []
        while len(out) < n:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tasks))
            take = order[self.position:self.position + n - len(out)]
            out += [self.tasks[i] for i in take]
            self.position += len(take)
            if self.position == len(self.tasks):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class RunState:
    """What `train_state.pt` keeps of the data: the task sampler and the PTX loader."""

    def __init__(self, tasks: TaskSampler, ptx):
        self.tasks, self.ptx = tasks, ptx

    def state_dict(self) -> dict:
        return {"tasks": self.tasks.state_dict(), "ptx": self.ptx and self.ptx.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tasks.load_state_dict(state["tasks"])
        if self.ptx:
            self.ptx.load_state_dict(state["ptx"])


def ptx_loader(cfg: RLConfig, tok, template, variables, context: int):
    """Packed batches of the PTX conversations (loss on assistant tokens, as SFT), or None."""
    if not cfg.ptx_data:
        return None
    width = min(cfg.seq_len, context)  # never past the model's window; longer conversations are left out
    examples, _ = fit_examples(encode_file(cfg.ptx_data, tok, template, variables, False), width, "drop")
    if not examples:
        raise ValueError(f"{cfg.ptx_data}: no conversation fits {width} tokens for PTX")
    return PackedSFTLoader(examples, cfg.ptx_batch, width, seed=cfg.seed)


def policy_loss(cfg: RLConfig, model, batch: list[Sample], adv: dict, weight: dict, stats: dict) -> torch.Tensor:
    """The objective on one micro-batch of whole samples (their share of the step's loss)."""
    logps = policy_logprobs(model, [q for s in batch for q in s.seqs])
    per_sample, at = [], 0
    for s in batch:
        per_sample.append(torch.cat(logps[at:at + len(s.seqs)]))
        at += len(s.seqs)
    old = [torch.tensor([o for q in s.seqs for o in q.old]) for s in batch]
    with torch.no_grad():
        ratio = torch.cat([lp.detach() - o for lp, o in zip(per_sample, old)])
        stats["log_ratio_abs_max"] = max(stats.get("log_ratio_abs_max", 0.0), ratio.abs().max().item())
        stats["log_ratio_sum"] = stats.get("log_ratio_sum", 0.0) + ratio.sum().item()
        stats["log_ratio_tokens"] = stats.get("log_ratio_tokens", 0) + ratio.numel()
    if cfg.algo == "k15":
        return k15_loss(torch.stack([lp.sum() for lp in per_sample]), torch.stack([o.sum() for o in old]),
                        torch.tensor([adv[id(s)] for s in batch]), torch.tensor([weight[id(s)] for s in batch]),
                        cfg.tau)
    lengths = [len(lp) for lp in per_sample]
    return grpo_loss(torch.cat(per_sample), torch.cat(old),
                     torch.tensor([adv[id(s)] for s in batch]).repeat_interleave(torch.tensor(lengths)),
                     torch.tensor([weight[id(s)] / n for s, n in zip(batch, lengths)]).repeat_interleave(
                         torch.tensor(lengths)), cfg.clip, cfg.kl_coef)


def update(cfg: RLConfig, model, opt, samples: list[Sample], ptx, autocast, lr: float) -> dict:
    """`cfg.updates` optimiser steps on the samples (and PTX); returns their statistics."""
    rewards, groups = [s.reward for s in samples], [s.group for s in samples]
    adv = dict(zip(map(id, samples), advantages(rewards, groups, normalise=cfg.algo == "grpo")))
    weight = dict(zip(map(id, samples), sample_weights(groups)))
    # one on-policy update without KL: a sample whose advantage is 0 has no gradient; skip its forward
    moving = [s for s in samples if adv[id(s)] != 0 or cfg.updates > 1 or cfg.kl_coef]
    stats, clipped, max_logits = {"trained_samples": len(moving)}, 0, None
    for g in opt.param_groups:
        g["lr"] = lr
    for _ in range(cfg.updates):
        loss = 0.0
        for batch in micro_batches(moving, cfg.seq_len):
            with autocast():
                part = policy_loss(cfg, model, batch, adv, weight, stats)
            part.backward()
            loss += part.item()
            m = model.max_logits()
            max_logits = m if max_logits is None else torch.maximum(max_logits, m)
        if ptx is not None:
            x, y, seg = ptx.next_batch()
            with autocast():
                lm = target_loss(model, x, y, [seg])
            (cfg.ptx_weight * lm).backward()
            stats["ptx_loss"] = lm.item()
            m = model.max_logits()
            max_logits = m if max_logits is None else torch.maximum(max_logits, m)
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if max_logits is not None and cfg.qk_clip_tau > 0:
            clipped += apply_qk_clip(model, max_logits, cfg.qk_clip_tau)
        stats["loss"] = loss
    stats["qk_clipped_heads"] = clipped
    if max_logits is not None:
        stats["max_logit"] = max_logits.amax(-1).tolist()
    n = stats.pop("log_ratio_tokens", 0)
    stats["log_ratio_mean"] = stats.pop("log_ratio_sum", 0.0) / n if n else None
    return stats


def eval_groups(cfg: RLConfig) -> dict[str, list]:
    """Held-out tasks (the split's test part): the trained kinds ("family"), and with --kinds the other
    kinds too ("other": what RL must not make worse); without --kinds, every kind ("all")."""
    from openk2.envs.tasks import KINDS
    pick = dict(n=cfg.eval_tasks, worlds=cfg.world_list)
    if not cfg.kind_list:
        return {"all": held_out(cfg.split, "test", **pick)}
    others = [k for k in KINDS if k not in cfg.kind_list]
    return {"family": held_out(cfg.split, "test", kinds=cfg.kind_list, **pick),
            **({"other": held_out(cfg.split, "test", kinds=others, **pick)} if others else {})}


def engine_of(model, folder: Path, concurrency: int) -> tuple[Engine, EngineLoop, ChatFormat]:
    """An engine over `model` (room for `concurrency` full contexts), its loop (stepped by `collect`) and
    the chat format of the checkpoint folder."""
    fmt = ChatFormat.for_model(model, chat_tokenizer(folder, model.cfg.vocab_size), folder)
    engine = Engine(model, EngineConfig(cache_tokens=concurrency * model.cfg.max_position_embeddings,
                                        max_batch=concurrency, prefill_chunk=1024))
    return engine, EngineLoop(engine), fmt


def evaluate_groups(loop: EngineLoop, client, groups: dict[str, list], concurrency: int) -> dict[str, dict]:
    """Greedy episodes of every task of `groups` (each once) on `loop`'s engine: each group's summary
    (envs/evaluate.summarize)."""
    tasks = list({t.id: t for ts in groups.values() for t in ts}.values())
    budget = Budget(max_turns=16, max_tokens=4096, turn_tokens=256)
    results = collect(loop, lambda: evaluate(tasks, lambda t: client, budget, GREEDY, concurrency, progress=False))
    by_id = {r["id"]: r for r in results}
    return {name: summarize([by_id[t.id] for t in ts]) for name, ts in groups.items()}


def make_critic(cfg: RLConfig, policy):
    if cfg.critic == "none":
        return None
    return policy if cfg.critic == "self" else OpenAIClient(cfg.critic)


def rl(cfg: RLConfig, stop_at: int | None = None) -> dict:
    """Run (or resume) RL; returns the last step's metrics. `stop_at`: leave after that step."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out, folder = Path(cfg.out_dir), Path(cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)

    def note(text):
        print(f"[openk2] {text}", file=sys.stderr, flush=True)
    ckpt = latest_checkpoint(out, note) if cfg.resume else None
    state = torch.load(ckpt / "train_state.pt", weights_only=False) if ckpt else None
    if state:
        _check_same_trajectory(cfg, state["config"], ckpt)
    model = load_hf(ckpt or folder, dtype=torch.float32, progress=False)
    engine, loop, fmt = engine_of(model, folder, cfg.concurrency)
    template, ctx = load_chat_template(folder), model.cfg.max_position_embeddings
    client, eval_client = EngineClient(loop, fmt, logprobs=True), EngineClient(loop, fmt)
    pick = dict(n=cfg.pool, worlds=cfg.world_list, kinds=cfg.kind_list)
    sampler = TaskSampler(held_out(cfg.split, "train", **pick), cfg.seed)
    test = eval_groups(cfg)
    ptx = ptx_loader(cfg, fmt.tokenizer, template, fmt.template_vars, ctx)
    data, opt = RunState(sampler, ptx), build_optimizer(cfg, model)
    step = restore(state, opt, data)
    if step >= cfg.steps:
        note(f"the run in {out} is complete ({step} of {cfg.steps} steps); nothing to resume")
        return final_metrics(out)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cfg.autocast == "bfloat16" else nullcontext
    critic = make_critic(cfg, eval_client)

    def held_out_eval() -> dict:
        model.eval()
        scores = evaluate_groups(loop, eval_client, test, cfg.concurrency)
        return {f"eval_{name}_{k}": s[k] for name, s in scores.items() for k in ("success", "arguments")}

    log = open_log(out / "metrics.jsonl", step)
    log.write(json.dumps({"event": "start", "config": dataclasses.asdict(cfg), "model": model.cfg.to_hf_dict(),
                          "git": git_revision(), "torch": torch.__version__, "resumed_from": step,
                          "train_tasks": len(sampler.tasks),
                          "eval_tasks": {name: len(ts) for name, ts in test.items()}}) + "\n")
    if step == 0:
        log.write(json.dumps({"step": 0, **held_out_eval()}) + "\n")
        log.flush()
    bar, metrics = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True), {}
    while step < min(cfg.steps, stop_at or cfg.steps):
        temperature, tasks = cfg.temperature_at(step), sampler.next(cfg.batch_size)
        t0 = time.perf_counter()
        model.eval()
        model.record_max_logits(False)
        samples = collect(loop, lambda: rollout(cfg, tasks, client, temperature, step, critic))
        t1 = time.perf_counter()
        model.train()
        model.record_max_logits(True)
        lr = lr_at(cfg, step)
        stats = update(cfg, model, opt, samples, ptx, autocast, lr)
        t2 = time.perf_counter()
        model.eval()  # the sync: the engine's next step reads the updated parameters in place, and
        model.record_max_logits(False)
        engine.weights_changed()  # no row cached under the old weights is served again
        t3 = time.perf_counter()
        step += 1
        metrics = {"step": step, "temperature": temperature, "lr": lr, **rollout_metrics(samples),
                   **stats, "rollout_s": t1 - t0, "train_s": t2 - t1, "sync_s": t3 - t2}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics.update(held_out_eval())
        if step % cfg.log_every == 0 or any(k.startswith("eval_") for k in metrics):
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", success=f"{metrics['success']:.2f}",
                        T=f"{temperature:.2f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(out / "checkpoints" / f"step_{step:06d}", model, opt, data, fmt.tokenizer,
                            step, cfg, {"chat_template.jinja": template} if template else {})
    bar.close()
    log.close()
    return metrics


def rl_command(argv: list[str]) -> None:
    """`openk2 rl CHECKPOINT [flags]`: the run, then held-out success at its first and last evaluation,
    and the plots."""
    from openk2.train.plot import eval_success_keys, plot_run, read_metrics
    cfg = parse_rl_args(argv)
    rl(cfg)
    rows = read_metrics(cfg.out_dir)
    for key in eval_success_keys(rows):
        seen = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        print(f"{key}: " + " -> ".join(f"{100 * v:.1f} % (step {s})" for s, v in (seen[0], seen[-1])))
    print(f"plots: {', '.join(str(p) for p in plot_run(cfg.out_dir))}")
