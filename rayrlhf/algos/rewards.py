"""Reward shaping and the reward-difference diagnostics of MetaRM."""
import math
from typing import Dict, Tuple

import torch


def clip_rewards(rewards: torch.Tensor, clip_value: float) -> torch.Tensor:
    """Clamp rewards to [-clip_value, clip_value] (the paper clips at 0.8)."""
    return rewards.clamp(-clip_value, clip_value)


def merge_moments(count: int, mean: float, m2: float, values: torch.Tensor) -> Tuple[int, float, float]:
    """Chan et al.'s parallel update of (n, mean, M2 = Σ(x - mean)²) with a batch of values (any shape)."""
    batch = values.detach().double().flatten()
    batch_count = batch.numel()
    if batch_count == 0:
        return count, mean, m2
    batch_mean = batch.mean().item()
    batch_m2 = ((batch - batch_mean) ** 2).sum().item()
    total = count + batch_count
    delta = batch_mean - mean
    return total, mean + delta * batch_count / total, m2 + batch_m2 + delta**2 * count * batch_count / total


def normalize_rewards(scores: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / std, the RM's scores on the scale reward_clip assumes (MOSS-RLHF's reward normalisation,
    before clipping at δ = 0.8). scores: (B,) -> (B,)."""
    return (scores - mean) / (std + eps)


class RunningRewardMoments:
    """Mean and standard deviation of every RM score seen since the last reset: the driver resets it when
    the RM changes (each round), so scores are normalised by the statistics of the RM that gave them."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, scores: torch.Tensor) -> None:
        self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, scores)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0


def token_level_rewards(
    sequence_rewards: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor, kl_coefficient: float
) -> torch.Tensor:
    """Per-token PPO rewards: -β·KL_t on every response token, plus the RM score on the last one.

    sequence_rewards: (B,); kl_per_token, mask: (B, T). Returns (B, T).
    """
    rewards = -kl_coefficient * kl_per_token * mask
    last_token = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & (mask > 0)
    return rewards + last_token.to(rewards.dtype) * sequence_rewards.unsqueeze(1)


def same_prompt_differences(group_values: torch.Tensor) -> torch.Tensor:
    """v(x, s_i) - v(x, s_j) for every pair i < j of a prompt's k responses: (P, k) -> (P, k(k-1)/2)."""
    k = group_values.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=group_values.device), diagonal=1)
    return (group_values.unsqueeze(2) - group_values.unsqueeze(1))[:, upper]


def reward_difference_statistics(group_rewards: torch.Tensor) -> Dict[str, float]:
    """The paper's diagnostic: the distribution of r(x, s_i) - r(x, s_j) over same-prompt pairs i<j.

    group_rewards: (P, k). When the RM stops distinguishing a drifted policy's responses, the variance of
    these differences collapses. Returns variance, mean absolute difference and the pair count.
    """
    differences = same_prompt_differences(group_rewards).flatten()
    return {
        "reward_difference_variance": differences.var(unbiased=False).item(),
        "reward_difference_mean_abs": differences.abs().mean().item(),
        "reward_difference_pairs": differences.numel(),
    }


def gold_pair_accuracy(rewards: torch.Tensor, gold: torch.Tensor) -> Dict[str, float]:
    """How often the RM orders two same-prompt responses as the gold reward does.

    rewards, gold: (P, k). Every pair i<j of a prompt with gold_i != gold_j counts once; the RM is right
    when sign(r_i - r_j) == sign(gold_i - gold_j). Returns accuracy and the number of pairs.
    """
    reward_differences, gold_differences = same_prompt_differences(rewards), same_prompt_differences(gold)
    labelled = gold_differences != 0
    correct = (torch.sign(reward_differences) == torch.sign(gold_differences)) & labelled
    pairs = int(labelled.sum())
    return {"gold_pair_accuracy": correct.sum().item() / max(pairs, 1), "gold_pairs": pairs}
