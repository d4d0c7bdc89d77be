"""Rollouts: K episodes of each task through the agent loop on the in-process Engine (`rollout`: each
scored by `rewards.py` into a `Sample`), and what the trainer makes of them.

An episode's model calls (`Episode.generations`: the prompt ids the model read, the ids it sampled
and their log-probs, taken by the engine as it sampled) become `Sequence`s: a call whose prompt
starts with the previous call's prompt and reply (the chat template re-renders what was sampled,
then appends tool results or a user turn) extends that sequence, so a whole episode is usually one
forward; otherwise a new sequence starts. Only sampled tokens are targets: the system prompt, user
turns and tool results are context, never trained (masked from the loss).

`collect` runs the rollout coroutine on a helper thread while the calling thread steps the engine:
all of torch's work (decode, then training) stays on one thread and one OpenMP pool.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import torch

from openk2.agent.runtime import Budget
from openk2.envs.play import gather_limited, play
from openk2.rl.rewards import budget_of, critique, parse_budgets, truncated, verifiable


@dataclass
class Sequence:
    ids: list[int]  # prompt and sampled ids, in order
    targets: list[int]  # positions in `ids` of sampled tokens (each predicted from the position before)
    old: list[float]  # the rollout policy's log-prob of each target

    def extend(self, prompt: list[int], completion: list[int], logprobs: list[float]) -> None:
        self.targets += range(len(prompt), len(prompt) + len(completion))
        self.ids, self.old = prompt + completion, self.old + logprobs


def sequences(generations: list[dict]) -> list[Sequence]:
    """The model calls of one episode as few sequences as their prompts allow (see the module's notes)."""
    out: list[Sequence] = []
    for g in generations:
        prompt, completion, logprobs = g["prompt_ids"], g["completion_ids"], g["logprobs"]
        if logprobs is None or len(logprobs) != len(completion):
            raise ValueError("a model call without one log-prob per sampled token (an EngineClient with "
                             "logprobs=True records them)")
        if not completion:
            continue
        if not (out and prompt[:len(out[-1].ids)] == out[-1].ids):
            out.append(Sequence([], [], []))
        out[-1].extend(list(prompt), list(completion), list(logprobs))
    return out


@dataclass
class Sample:
    """One episode of a task, scored: its group is the task's index in the step's batch."""
    task: object
    group: int
    episode: object
    reward: float
    details: dict = field(default_factory=dict)  # the score and the reward's parts
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(s.targets) for s in self.seqs)

    @property
    def length(self) -> int:  # ids the trainer reads for it
        return sum(len(s.ids) for s in self.seqs)


def micro_batches(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Whole samples, in order, grouped so that each group's ids fit `max_tokens` (a longer sample
    alone); empty samples (no sampled token) are left out."""
    out, used = [], max_tokens
    for s in samples:
        if not s.seqs:
            continue
        if used + s.length > max_tokens:
            out.append([])
            used = 0
        out[-1].append(s)
        used += s.length
    return out


def policy_logprobs(model, seqs: list[Sequence]) -> list[torch.Tensor]:
    """log π_θ of each sequence's targets [n_targets] (with grad), all sequences in one packed row,
    attention kept inside each (segment ids); logits only where a target is predicted."""
    device = model.lm_head.weight.device
    x = torch.tensor([i for s in seqs for i in s.ids[:-1]], device=device)
    seg = torch.tensor([n for n, s in enumerate(seqs, 1) for _ in s.ids[:-1]], device=device)  # (0: padding)
    keep = torch.zeros(len(x), dtype=torch.bool, device=device)
    offsets = torch.tensor([0] + [len(s.ids) - 1 for s in seqs[:-1]]).cumsum(0).tolist()
    keep[[o + t - 1 for o, s in zip(offsets, seqs) for t in s.targets]] = True
    y = torch.tensor([s.ids[t] for s in seqs for t in s.targets], device=device)
    logits_MV = model(x[None], segment_ids=seg[None], keep=keep[None])
    logp_M = logits_MV.float().log_softmax(-1).gather(-1, y[:, None])[:, 0]
    return list(logp_M.split([len(s.targets) for s in seqs]))


def collect(engine_loop, make_coroutine):
    """asyncio.run(make_coroutine()) on a helper thread while this thread steps `engine_loop`'s engine;
    returns the coroutine's result (or raises its error)."""
    box: dict = {}

    def side():
        try:
            box["out"] = asyncio.run(make_coroutine())
        except BaseException as e:  # noqa: BLE001 — re-raised on the calling thread
            box["error"] = e
        finally:
            box["done"] = True
            engine_loop.wake.set()

    thread = threading.Thread(target=side, name="openk2-rollouts", daemon=True)
    thread.start()
    engine_loop.run_here(keep_going=lambda: "done" not in box)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


async def rollout(cfg, tasks: list, client, temperature: float, step: int, critic=None) -> list[Sample]:
    """`cfg.samples` scored episodes of each task (group = its index), at most `concurrency` at once."""
    budgets = parse_budgets(cfg.budgets, cfg.budget)

    async def one(item):
        group, task, k = item
        tokens = budget_of(task.kind, budgets)
        budget = Budget(max_turns=cfg.max_turns, max_tokens=tokens, turn_tokens=tokens)
        world, ep = await play(task, client, budget=budget, temperature=temperature,
                               seed=cfg.seed * 1_000_003 + step * 10_007 + group * 101 + k)
        reward, details = verifiable(task, ep, world, partial=cfg.partial, format_penalty=cfg.format_penalty)
        cut = truncated(ep)
        details = {**details, "truncated": cut, "verifiable": reward}
        return Sample(task, group, ep, reward - cfg.budget_penalty * cut, details, sequences(ep.generations))

    items = [(g, task, k) for g, task in enumerate(tasks) for k in range(cfg.samples)]
    samples = await gather_limited(items, one, cfg.concurrency)
    if critic is not None:
        for g, task in enumerate(tasks):
            group = [s for s in samples if s.group == g]
            for s, won in zip(group, await critique(critic, task, [s.episode for s in group])):
                s.details["critic"] = won
                s.reward += cfg.critic_weight * won
    return samples


def rollout_metrics(samples: list[Sample]) -> dict:
    r = torch.tensor([s.reward for s in samples])
    return {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
            "success": sum(s.details["success"] for s in samples) / len(samples),
            "response_tokens": sum(s.episode.completion_tokens for s in samples) / len(samples),
            "truncation_rate": sum(s.details["truncated"] for s in samples) / len(samples),
            "episodes": len(samples), "sequences_per_episode": sum(len(s.seqs) for s in samples) / len(samples)}
