"""PPO pieces: generalised advantage estimation and the clipped policy and value losses.

Shapes: B sequences, T response tokens; `mask` (B, T) is 1 on real response tokens, 0 on padding.
Each loss returns (loss, metrics) so callers log what people look at (clip fraction, approx KL).
"""
from typing import Dict, Optional, Tuple

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where mask is 1 (token-level average)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def generalized_advantage_estimation(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016), per token:

        δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γ λ A_{t+1},   returns R_t = A_t + V_t

    with V and A zero past the last real token. rewards, values, mask: (B, T).
    Returns (advantages, returns), both (B, T), zero on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float,
    behaviour_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), as a loss to minimise:

        ρ_t = exp(log π(a_t) - log π_old(a_t)),
        loss = -mean_t w_t · min(ρ_t A_t, clip(ρ_t, 1-ε, 1+ε) A_t)

    with w_t = 1, or, when the samples came from another policy than π_old (an asynchronous rollout, one update
    behind), `behaviour_weights` w_t = truncated_importance_weights(...): the decoupled PPO objective (Hilton et
    al. 2021), whose trust region stays around π_old. All inputs (B, T). Metrics: clip_fraction (share of tokens
    where the clipped term is taken) and approx_kl = mean((ρ-1) - log ρ), the k3 estimate of KL(π_old || π).
    """
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    loss = -masked_mean(surrogate if behaviour_weights is None else behaviour_weights * surrogate, mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, metrics


def truncated_importance_weights(old_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, cap: float
                                 ) -> torch.Tensor:
    """w_t = min(π_old(a_t) / π_behaviour(a_t), cap): the importance weight of a token the rollout engine sampled
    from π_behaviour (in asynchronous mode the policy one update before π_old), truncated so that a token the
    engine found unlikely cannot dominate the loss (Espeholt et al. 2018's truncation; Yao et al. 2025's
    truncated IS for engine/trainer mismatch). Both log-probs (B, T), the result (B, T), not differentiated."""
    return torch.exp(old_log_probs - behaviour_log_probs).clamp(max=cap).detach()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 · mean_t max((V - R)², (clip(V, V_old ± ε) - R)²). Inputs (B, T)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    squared_error = torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = 0.5 * masked_mean(squared_error, mask)
    with torch.no_grad():
        metrics = {"value_clip_fraction": masked_mean(((values - old_values).abs() > clip_range).float(), mask)}
    return loss, metrics


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[target - prediction] / Var[target] over masked tokens: 1 is perfect, <= 0 is useless."""
    target_mean = masked_mean(targets, mask)
    target_variance = masked_mean((targets - target_mean) ** 2, mask)
    residual = targets - predictions
    residual_variance = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return 1.0 - residual_variance / target_variance.clamp(min=1e-8)


def at_least_float32(values: torch.Tensor) -> torch.Tensor:
    """bfloat16/float16 values in float32 (a softmax over a vocabulary needs its digits); float64 stays float64."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def gather_log_probs(logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False):
    """log softmax(logits)[token] at each position, in float32 or wider, and (with_entropy) the entropy
    H = -Σ_v p_v log p_v of each position's distribution, both from one log-softmax over the vocabulary (the
    largest tensor of a PPO pass). logits (B, T, V), tokens (B, T) -> ((B, T), (B, T) or None). The entropy is a
    metric: computed without gradient, so its (B, T, V) intermediates are not kept for the backward pass."""
    log_softmax = torch.log_softmax(at_least_float32(logits), dim=-1)  # (B, T, V)
    token_log_probs = log_softmax.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_log_probs, None
    with torch.no_grad():
        entropy = torch.special.entr(log_softmax.exp()).sum(dim=-1)  # entr(p) = -p log p, 0 at p = 0
    return token_log_probs, entropy


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, total: torch.Tensor, total_squares: torch.Tensor,
                  count: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - μ) / σ on the masked positions, zero elsewhere, with μ and σ² taken from sums over the
    whole batch (Σv, Σv², n; summed over ranks by the caller), so every rank whitens alike. (B, T) -> (B, T)."""
    mean = total / count
    variance = (total_squares / count - mean**2).clamp(min=0)
    return (values - mean) * torch.rsqrt(variance + eps) * mask
