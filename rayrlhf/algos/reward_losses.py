"""Reward-model losses: the Bradley-Terry preference loss and MetaRM's difference loss."""
import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Vanilla reward-model loss, MetaRM eq. (3):

        L_θ(X_t) = -mean log σ(r_θ(x, y_w) - r_θ(x, y_l))

    chosen_rewards, rejected_rewards: (B,) rewards of the preferred and the other response.
    Returns a scalar. `logsigmoid` keeps it finite for large negative margins.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def difference_loss(group_rewards: torch.Tensor) -> torch.Tensor:
    """MetaRM difference loss J, eq. (5) of Dou et al. 2024 (DESIGN.md step 1):

        J_θ(X_s) = mean over prompts of (2 / k²) Σ_{i<j} σ(|r_θ(x, s_i) - r_θ(x, s_j)|)

    group_rewards: (P, k) rewards of k policy samples for each of P prompts, k >= 2.
    Returns a scalar. The meta step *ascends* J, spreading the rewards of same-prompt samples apart.
    """
    if group_rewards.dim() != 2 or group_rewards.shape[1] < 2:
        raise ValueError(f"difference_loss needs (prompts, k>=2) rewards, got shape {tuple(group_rewards.shape)}")
    k = group_rewards.shape[1]
    # (P, k, k) pairwise absolute differences; the strict upper triangle is the i<j pairs.
    pairwise = (group_rewards.unsqueeze(2) - group_rewards.unsqueeze(1)).abs()
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=group_rewards.device), diagonal=1)
    per_prompt = torch.sigmoid(pairwise[:, upper]).sum(dim=1) * (2.0 / k**2)  # (P,)
    return per_prompt.mean()


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the chosen response gets the strictly higher reward. (B,), (B,) -> scalar."""
    return (chosen_rewards > rejected_rewards).float().mean()
