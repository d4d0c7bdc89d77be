"""Policy objectives over groups of K samples of one prompt: K2's (Kimi k1.5's) squared loss and GRPO.

Both take the policy's log-probs of the sampled tokens under the weights being trained (with grad),
the rollout policy's (recorded by the engine as it sampled: `old`), the rewards and each sample's
group. They return a sum of per-sample (K1.5) or per-token (GRPO) terms, each already weighted by
its share of the batch (`sample_weights`), so a batch split into micro-batches gives the same loss
and gradient as in one piece (each micro-batch holds whole samples).

- K1.5 (K2-SPEC §9): L = E_x [ 1/K Σ_i ( r_i − r̄(x) − τ·log(π_θ(y_i|x) / π_old(y_i|x)) )² ], the
  log-ratio over the whole response (every sampled token of every turn). Its gradient at θ = old is
  −2τ·(r_i − r̄)·∇log π_θ(y_i|x): a policy gradient with the group mean as baseline, which the τ term
  then holds near the rollout policy when a batch is used for more than one update.
- GRPO (DeepSeekMath): per token, −min(ρ·A, clip(ρ, 1 ± ε)·A) with ρ = π_θ/π_old of that token and
  A = (r_i − r̄) / (std of the group's rewards + 1e-6), averaged over a sample's tokens, then over
  samples; plus β times the k3 estimate of KL(π_θ ‖ π_ref) per token, where π_ref is the rollout
  policy (no second copy of the model is kept; the usual reference is the starting checkpoint).
π_old is what the engine recorded: the log-prob under the raw logits (temperature 1, no grammar mask),
the distribution the trainer computes too; a sample drawn at another temperature is then weighed
against the policy, not against the sampler's tempered distribution.
`tests/test_rl.py` binds both to a direct per-sample computation.
"""

from __future__ import annotations

import torch


def group_stats(rewards: list[float], groups: list[int]) -> tuple[list[float], list[float], list[int]]:
    """Per sample: its group's mean reward, its group's (population) standard deviation, its group's size."""
    by: dict[int, list[float]] = {}
    for r, g in zip(rewards, groups):
        by.setdefault(g, []).append(r)
    mean = {g: sum(rs) / len(rs) for g, rs in by.items()}
    std = {g: (sum((r - mean[g]) ** 2 for r in rs) / len(rs)) ** 0.5 for g, rs in by.items()}
    return [mean[g] for g in groups], [std[g] for g in groups], [len(by[g]) for g in groups]


def advantages(rewards: list[float], groups: list[int], normalise: bool) -> list[float]:
    """r − r̄ of the sample's group (K1.5), divided by the group's std + 1e-6 if `normalise` (GRPO)."""
    mean, std, _ = group_stats(rewards, groups)
    return [(r - m) / (s + 1e-6) if normalise else r - m for r, m, s in zip(rewards, mean, std)]


def sample_weights(groups: list[int]) -> list[float]:
    """1 / (number of groups · the sample's group size): the expectation over prompts of the mean over K."""
    _, _, size = group_stats([0.0] * len(groups), groups)
    n_groups = len(set(groups))
    return [1.0 / (n_groups * k) for k in size]


def k15_loss(logp_N: torch.Tensor, old_N: torch.Tensor, adv_N: torch.Tensor, weight_N: torch.Tensor,
             tau: float) -> torch.Tensor:
    """Σ_i w_i (A_i − τ·(log π_θ(y_i) − log π_old(y_i)))²; log-probs summed over each sample's tokens [N]."""
    return (weight_N * (adv_N - tau * (logp_N - old_N)) ** 2).sum()


def grpo_loss(logp_T: torch.Tensor, old_T: torch.Tensor, adv_T: torch.Tensor, weight_T: torch.Tensor,
              clip: float = 0.2, kl_coef: float = 0.0) -> torch.Tensor:
    """Σ_t w_t (−min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t) + β·k3_t), tokens [T] of all samples, A_t and w_t
    (= the sample's weight / its token count) repeated over each sample's tokens."""
    log_ratio = logp_T - old_T
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * adv_T, ratio.clamp(1 - clip, 1 + clip) * adv_T)
    per_token = -surrogate
    if kl_coef:
        per_token = per_token + kl_coef * ((-log_ratio).exp() + log_ratio - 1)
    return (weight_T * per_token).sum()
