"""KL estimators and KL-penalty controllers.

Estimators (Schulman, "Approximating KL divergence", 2020) of KL(π || π_ref) from samples a ~ π, given
log_ratio = log π(a) - log π_ref(a), per token:
    k1 = log_ratio                      unbiased, high variance, can be negative
    k2 = ½ log_ratio²                   biased, low variance, >= 0
    k3 = (r - 1) - log r,  r = π_ref/π  unbiased, low variance, >= 0
"""

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the chosen kind. log_probs, ref_log_probs: (B, T) -> (B, T)."""
    log_ratio = log_probs - ref_log_probs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, coefficient: float):
        self.value = coefficient

    def update(self, observed_kl: float, num_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Adaptive β of Ziegler et al. 2019 (eq. 2):

        e_t = clip(KL_observed / KL_target - 1, -0.2, 0.2),   β ← β (1 + e_t · n_steps / horizon)
    """

    def __init__(self, initial_coefficient: float, target_kl: float, horizon: int):
        self.value = initial_coefficient
        self.target_kl = target_kl
        self.horizon = horizon

    def update(self, observed_kl: float, num_steps: int) -> None:
        proportional_error = min(max(observed_kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * num_steps / self.horizon
