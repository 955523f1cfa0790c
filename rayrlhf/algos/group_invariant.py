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


def between_group_variance(means: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Σ_g (n_g / N) (v_g - v̄)², v̄ = Σ_g n_g v_g / N, N = Σ_g n_g: the variance of the group means weighted by the
    groups' soft sizes (the share of the batch's variance the grouping explains). Weighted, not the plain variance
    of the M means: maximising that puts one outlier in a group of its own (measured: docs/methods.md)."""
    total = sizes.sum().clamp(min=1e-8)
    overall = (sizes * means).sum() / total
    return (sizes / total * (means - overall) ** 2).sum()


def predictor_loss(returns: torch.Tensor, group_probabilities: torch.Tensor, beta_critic: float) -> torch.Tensor:
    """The group predictor's loss, -β_critic · Var_g(R_g) (between_group_variance), R_g the soft group mean return
    (Eq. 4: the predictor maximises the variance of returns across groups, so the groups separate easy from hard
    data). Gradients flow into group_probabilities only; returns are targets. Single-rank form (the learner reduces
    the sums)."""
    sums, sizes = group_sums(returns.detach(), group_probabilities)
    return -beta_critic * between_group_variance(group_means(sums, sizes), sizes)


def invariance_penalty(surrogate: torch.Tensor, group_probabilities: torch.Tensor, beta_policy: float) -> torch.Tensor:
    """β_policy · Var_g(S_g) (between_group_variance), S_g the p_φ-weighted mean of the per-sequence clipped surrogate
    in group g (Eq. 3: the policy should do equally well on every group). p_φ is held fixed (detached), so the
    penalty's gradient moves θ only. surrogate (N,) depends on θ. Single-rank form (the learner reduces the sums)."""
    sums, sizes = group_sums(surrogate, group_probabilities.detach())
    return beta_policy * between_group_variance(group_means(sums, sizes), sizes)


def high_return_group(group_mean_returns: torch.Tensor) -> int:
    """The group of the higher mean return: the "easy" group whose KL penalty is strengthened."""
    return int(torch.argmax(group_mean_returns))


def adaptive_kl_coefficients(kl_coef: float, high_group_probability: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sequence KL strength β_KL · (1 + λ · p_φ(g_high | τ_i)), (N,) (Eq. 6: larger on samples likely in the
    high-return group, so easy data is kept from over-optimising; relaxed toward β_KL on hard ones)."""
    return kl_coef * (1.0 + scale * high_group_probability)


# ---- exact gradients from batch-wide statistics -------------------------------------------------------------
# Both variances are non-linear in the whole batch, which several micro-batches and ranks share. Their gradients
# are linear in each sequence's own term once the batch's group statistics are known (a no-gradient pass gives
# them), so each micro-batch backpropagates Σ_i (weight_i · term_i) and the sum over micro-batches and ranks is the
# exact gradient of the whole batch's variance.

def invariance_gradient_weights(group_surrogate_sums: torch.Tensor, group_sizes: torch.Tensor,
                                beta_policy: float) -> torch.Tensor:
    """w_g = β_policy · (2/N) · (S_g - S̄), (M,), so that ∂(β_policy · Var_g S_g) / ∂S_i = Σ_g p_ig w_g (the term of
    S̄ cancels, since Σ_g n_g (S_g - S̄) = 0). group_surrogate_sums (M,) Σ_i p_ig S_i and group_sizes (M,) Σ_i p_ig
    over the whole batch, N their total."""
    total = group_sizes.sum().clamp(min=1e-8)
    means = group_means(group_surrogate_sums, group_sizes)
    return beta_policy * (2.0 / total) * (means - group_surrogate_sums.sum() / total)


def predictor_gradient_weights(returns: torch.Tensor, group_mean_returns: torch.Tensor, group_sizes: torch.Tensor,
                               beta_critic: float) -> torch.Tensor:
    """G_ig = -β_critic · ((R_i - R̄)² - (R_i - R_g)²) / N, (N_part, M): ∂(-β_critic · Var_g R_g) / ∂p_ig, with R_g and
    n_g the whole batch's soft group mean returns and sizes (M,), N = Σ_g n_g, R̄ the batch mean (which p does not
    move); returns (N_part,) this part's rows. Putting i in g pays where R_i is nearer R_g than the batch mean. Exact
    up to a term equal across a row's groups (N's own change, zero where each row's p sums to 1), which the softmax
    that makes p removes."""
    total = group_sizes.sum().clamp(min=1e-8)
    overall = (group_sizes * group_mean_returns).sum() / total
    to_groups = (returns.unsqueeze(1) - group_mean_returns.unsqueeze(0)) ** 2  # (N_part, M)
    return -beta_critic * ((returns - overall).unsqueeze(1) ** 2 - to_groups) / total


def sequence_surrogates(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float) -> torch.Tensor:
    """S_i: each sequence's token mean of PPO's clipped surrogate min(ρ_t A_t, clip(ρ_t, 1 ± ε) A_t), (B,) from
    (B, T) inputs (the objective PPO maximises, per sequence; its group means are what GIL keeps equal)."""
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages)
    return (surrogate * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
