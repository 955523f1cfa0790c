"""The policy's part of one outer step of bilevel reward learning (rayrlhf/algos/bilevel.py), on a transformers
causal LM in this process: one inner step from the reference policy θ_0 and the sample weights of the
first-order hypergradient, which is exact for one inner step.

    A_i = r_i − mean_{x_i} r                           (the KL term vanishes at θ_0 = π_ref)
    θ_1 = θ_0 + γ (1/n) Σ_i A_i ∇_θ log π_θ0(s_i|x_i)
    v   = ∇_θ L(θ_1),  L = −(1/P) Σ_j log σ(β [log-ratio(y_wj) − log-ratio(y_lj)])
    c_i = ⟨∇_θ log π_θ0(s_i|x_i), v⟩ = [log π_θ0+εv(s_i) − log π_θ0−εv(s_i)] / 2ε   (central differences)
    w_i = (γ/n) (c_i − mean_{x_i} c)

so the reward model's step is ∇_φ Σ_i w_i r_φ(s_i) (RewardModelTrainer.weighted_reward_step). The reference
parameters are restored after every step: the policy never leaves θ_0 (meta-training adapts it only in thought).
The directional derivative takes two forward passes instead of one backward per sample, which is what lets
the weights scale to real models; its error is O(ε² ‖v‖³) and `tests/test_bilevel.py` checks it against
per-sample gradients.

On several ranks each holds a share of the step's samples and pairs: the inner step's gradient and v are sums over
all of them (n and P are the step's totals), reduced across the ranks, so every rank moves to the same θ_1 and
reads the same v; each rank's weights are those of its own samples.
"""
from typing import Dict, List, Tuple

import torch
from torch import nn

from rayrlhf.algos.bilevel import centred_by_prompt, hypergradient_weights, implicit_reward_margins, outer_preference_loss
from rayrlhf.data.rollouts import SequenceBatch
from rayrlhf.training.distributed import sum_across_ranks
from rayrlhf.training.ppo_passes import sequence_log_probs


class BilevelPolicy:
    """The reference policy and what the outer step needs from it: β, the inner step size γ, and the central
    difference's step ε (in units of ‖v‖: the parameters move by ε·v/‖v‖, so ε is a distance in parameter space)."""

    def __init__(self, policy: nn.Module, beta: float, inner_lr: float, difference_step: float = 1e-2):
        self.policy, self.beta, self.inner_lr, self.difference_step = policy, beta, inner_lr, difference_step
        policy.eval()  # no dropout: the central difference compares two passes of the same function
        self.parameters = [p for p in policy.parameters() if p.requires_grad]
        self.reference = [p.detach().clone() for p in self.parameters]

    def sample_weights(self, samples: SequenceBatch, prompt_index: torch.Tensor, rewards: torch.Tensor,
                       chosen: SequenceBatch, rejected: SequenceBatch, total_samples: int, total_pairs: int
                       ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """w (n_rank,) for this rank's share of the domain's samples (their RM scores `rewards`, (n_rank,)) and of its
        labelled pairs, with total_samples and total_pairs the step's counts over all ranks; and the outer loss
        before and after the inner step (how far one step of policy optimisation against the RM moved the policy
        towards the domain's labels)."""
        reference_pairs = self._pair_log_probs(chosen, rejected, grad=False)
        self._inner_step(samples, centred_by_prompt(rewards.detach().float(), prompt_index), total_samples)
        # this rank's pairs' part of the mean over all pairs: the ranks' parts sum to L(θ_1)
        outer = self._outer_loss(chosen, rejected, reference_pairs) * (len(chosen) / total_pairs)
        direction = list(torch.autograd.grad(outer, self.parameters))
        outer_value = outer.detach().clone()
        for tensor in (*direction, outer_value):
            sum_across_ranks(tensor)
        projections = self._directional_derivatives(samples, direction)  # restores θ_0 first
        weights = hypergradient_weights(projections, prompt_index, self.inner_lr, total_samples)
        before = outer_preference_loss(torch.zeros(1)).item()  # log 2: at θ_0 every implicit-reward margin is 0
        return weights, {"outer_loss_before": before, "outer_loss_after": outer_value.item(),
                         "outer_gradient_norm": torch.sqrt(sum(d.square().sum() for d in direction)).item()}

    def _pair_log_probs(self, chosen: SequenceBatch, rejected: SequenceBatch, grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(grad):
            return sequence_log_probs(self.policy, chosen), sequence_log_probs(self.policy, rejected)

    def _outer_loss(self, chosen: SequenceBatch, rejected: SequenceBatch, reference: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        chosen_now, rejected_now = self._pair_log_probs(chosen, rejected, grad=True)
        return outer_preference_loss(implicit_reward_margins(chosen_now, rejected_now, reference[0], reference[1], self.beta))

    def _inner_step(self, samples: SequenceBatch, advantages: torch.Tensor, total_samples: int) -> None:
        """θ ← θ_0 + γ (1/n) Σ_i A_i ∇ log π_θ0(s_i), the sum over every rank's samples."""
        log_probs = sequence_log_probs(self.policy, samples)
        gradients = torch.autograd.grad(log_probs, self.parameters, grad_outputs=advantages.to(log_probs.dtype) / total_samples)
        for gradient in gradients:
            sum_across_ranks(gradient)
        with torch.no_grad():
            for parameter, reference, gradient in zip(self.parameters, self.reference, gradients):
                parameter.copy_(reference + self.inner_lr * gradient)

    def _directional_derivatives(self, samples: SequenceBatch, direction: List[torch.Tensor]) -> torch.Tensor:
        """c_i = ⟨∇ log π_θ0(s_i), v⟩ by central differences along v; leaves the policy at θ_0."""
        norm = torch.sqrt(sum(d.float().square().sum() for d in direction))
        if norm == 0:
            self._move_along(direction, 0.0)
            return torch.zeros(len(samples))
        epsilon = self.difference_step / norm.item()
        values = []
        for sign in (1.0, -1.0):
            self._move_along(direction, sign * epsilon)
            with torch.no_grad():
                values.append(sequence_log_probs(self.policy, samples))
        self._move_along(direction, 0.0)
        return ((values[0] - values[1]) / (2 * epsilon)).float()

    def _move_along(self, direction: List[torch.Tensor], scale: float) -> None:
        """θ ← θ_0 + scale · v."""
        with torch.no_grad():
            for parameter, reference, step in zip(self.parameters, self.reference, direction):
                parameter.copy_(reference + scale * step)
