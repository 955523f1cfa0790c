"""Group invariant learning's part of a PPO step on one rank (the math: rayrlhf/algos/group_invariant.py).

The group predictor is the critic's `group_head` (rayrlhf/models/heads.py: attach_group_head) applied to the
critic's last-token hidden states taken in the experience pass (held fixed for the step, so the predictor is a
linear-softmax classifier over them and the value loss is untouched). Batch-wide group statistics are sums
reduced over the PPO ranks; each micro-batch then backpropagates the exact gradient of the whole batch's
variance through per-sequence weights, so 2 ranks or any micro-batch size give the 1-rank, whole-batch update.
"""
from typing import Dict, Tuple

import torch

from rayrlhf.algos.group_invariant import (adaptive_kl_coefficients, group_means, group_sums, high_return_group,
                                           invariance_gradient_weights, predictor_gradient_weights, between_group_variance)
from rayrlhf.config import GroupInvariantConfig
from rayrlhf.training.distributed import sum_across_ranks, world_size


def reduced_group_sums(values: torch.Tensor, probabilities: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """group_sums over every rank's rows: (Σ p v, Σ p), each (M,)."""
    sums = torch.stack(group_sums(values.detach().float(), probabilities.detach().float()))  # (2, M)
    sum_across_ranks(sums)
    return sums[0], sums[1]


class GroupInvariance:
    """GIL's hooks into the PPO learner: KL coefficients per sequence, the predictor's and the policy's gradient
    terms, and the step's group metrics."""

    def __init__(self, settings: GroupInvariantConfig, critic_engine):
        self.settings, self.critic = settings, critic_engine

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """p_φ(g | τ_i) for the rows whose critic features (N, H) are given: (N, M), with φ's gradient."""
        head = self.critic.module.group_head
        return torch.softmax(head(features.to(head.weight.dtype)).float(), dim=-1)

    @torch.no_grad()
    def kl_coefficients(self, features: torch.Tensor, scores: torch.Tensor, kl_coefficient: float) -> torch.Tensor:
        """Each sequence's KL coefficient, (N, 1): with adaptive_kl, β (1 + λ p(high | τ)), the high group the one of the
        higher mean RM score over the whole batch; else β for all."""
        if not self.settings.adaptive_kl:
            return torch.full((len(scores), 1), kl_coefficient, device=scores.device)
        probabilities = self.probabilities(features)
        high = high_return_group(group_means(*reduced_group_sums(scores, probabilities)))
        return adaptive_kl_coefficients(kl_coefficient, probabilities[:, high], self.settings.adaptive_kl_scale).unsqueeze(1)

    def predictor_weights(self, features: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        """G (N, M) for this rank's rows of a mini-batch, scaled by the world size (the engine averages gradients
        over ranks): Σ_i Σ_g p_ig G_ig has the gradient of -β_critic Var_g(R_g) over the whole mini-batch."""
        with torch.no_grad():
            sums, sizes = reduced_group_sums(returns, self.probabilities(features))
            weights = predictor_gradient_weights(returns.float(), group_means(sums, sizes), sizes, self.settings.beta_critic)
        return weights * world_size()

    @torch.no_grad()
    def penalty_weights(self, features: torch.Tensor, surrogates: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """c (N,) for this rank's rows, from their per-sequence surrogates at the current θ (a no-gradient pass), scaled
        by the world size: Σ_i c_i S_i(θ) has the gradient of β_policy Var_g(S_g) over the whole mini-batch; and the
        penalty's value β_policy Var_g(S_g)."""
        probabilities = self.probabilities(features)
        sums, sizes = reduced_group_sums(surrogates, probabilities)
        weights = invariance_gradient_weights(sums, sizes, self.settings.beta_policy)
        penalty = self.settings.beta_policy * between_group_variance(group_means(sums, sizes), sizes).item()
        return (probabilities @ weights) * world_size(), penalty

    @torch.no_grad()
    def metrics(self, features: torch.Tensor, returns: torch.Tensor, kl_per_sequence: torch.Tensor) -> Dict[str, float]:
        """The step's groups (whole batch): soft sizes, mean returns, their variance, mean KL per sequence."""
        probabilities = self.probabilities(features)
        return_sums, sizes = reduced_group_sums(returns, probabilities)
        kl_sums, _ = reduced_group_sums(kl_per_sequence, probabilities)
        means = group_means(return_sums, sizes)
        result = {"gil_return_variance": between_group_variance(means, sizes).item()}
        for group, (size, mean, kl) in enumerate(zip(sizes.tolist(), means.tolist(), group_means(kl_sums, sizes).tolist())):
            result.update({f"gil_group{group}_size": size, f"gil_group{group}_return": mean, f"gil_group{group}_kl": kl})
        return result
