"""Group invariant policy learning (Zheng et al. 2023, arXiv 2310.11971): the math, as pure functions of tensors.

Shapes: N sequences (a rank's rows of a PPO mini-batch), M groups (2 in the paper: "easy" and "hard" by return).
`group_probabilities` (N, M) is the group predictor's p_φ(g | x, y), rows summing to 1; `returns` (N,) each
sequence's return (the GAE return at its first response token).

Statistics that several ranks share are built from sums: `group_sums` gives each rank's Σ_i p_ig R_i and
Σ_i p_ig, the learner all-reduces them, and `group_means` divides, so 2 ranks compute what 1 rank would on the
whole batch. Which parts come from the paper and which are reconstructed: docs/methods.md.
"""
from typing import Tuple

import torch


def group_sums(values: torch.Tensor, group_probabilities: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Σ_i p_ig v_i, Σ_i p_ig) for every group g: the soft group totals and soft group sizes, each (M,).
    values (N,), group_probabilities (N, M)."""
    return group_probabilities.transpose(0, 1) @ values, group_probabilities.sum(dim=0)


def group_means(weighted_sums: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Soft group means v_g = Σ_i p_ig v_i / Σ_i p_ig, (M,); an empty group (size 0) has mean 0."""
    return weighted_sums / sizes.clamp(min=1e-8)


def variance_across_groups(means: torch.Tensor) -> torch.Tensor:
    """Var_g(v_g) = (1/M) Σ_g (v_g - mean_g v_g)², the population variance of the M group means (a scalar)."""
    return ((means - means.mean()) ** 2).mean()


def predictor_loss(returns: torch.Tensor, group_probabilities: torch.Tensor, beta_critic: float) -> torch.Tensor:
    """The group predictor's loss, -β_critic · Var_g(R_g), R_g the soft group mean return (Eq. 4: the predictor
    maximises the variance of returns across groups, so the groups separate easy from hard data). Gradients flow
    into group_probabilities only; returns are targets. Single-rank form (the learner reduces the sums)."""
    return -beta_critic * variance_across_groups(group_means(*group_sums(returns.detach(), group_probabilities)))


def invariance_penalty(surrogate: torch.Tensor, group_probabilities: torch.Tensor, beta_policy: float) -> torch.Tensor:
    """β_policy · Var_g(S_g), S_g the p_φ-weighted mean of the per-sequence clipped surrogate in group g (Eq. 3:
    the policy should do equally well on every group). p_φ is held fixed (detached), so the penalty's gradient
    moves θ only. surrogate (N,) depends on θ. Single-rank form (the learner reduces the sums)."""
    return beta_policy * variance_across_groups(group_means(*group_sums(surrogate, group_probabilities.detach())))


def high_return_group(group_mean_returns: torch.Tensor) -> int:
    """The group of the higher mean return: the "easy" group whose KL penalty is strengthened."""
    return int(torch.argmax(group_mean_returns))


def adaptive_kl_coefficients(kl_coef: float, high_group_probability: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sequence KL strength β_KL · (1 + λ · p_φ(g_high | τ_i)), (N,) (Eq. 6: larger on samples likely in the
    high-return group, so easy data is kept from over-optimising; relaxed toward β_KL on hard ones)."""
    return kl_coef * (1.0 + scale * high_group_probability)
