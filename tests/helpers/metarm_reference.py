"""An independent reference of the MetaRM update (Algorithm 1 of Dou et al. 2024) with torch.func, for tests:
the product's update (rayrlhf/training/reward_trainer.py, with rayrlhf/algos/metarm.py) is checked against it.

    θ_0 = θ,   θ_{i+1} = θ_i + η ∇J(θ_i)   for i < inner_steps        (meta step, gradient ASCENT)
    first order:  g = ∇_θ' L(θ')  with θ' = θ_inner_steps   (applied to θ by the optimizer)
    second order: g = ∇_θ L(θ'(θ))   (exact, differentiating through the unrolled ascent)
"""
from typing import Callable, Dict, List

import torch
from torch.func import grad

Params = Dict[str, torch.Tensor]
Objective = Callable[[Params], torch.Tensor]


def ascent_step(params: Params, gradients: Params, eta: float) -> Params:
    """θ + η g, written here again so that the reference shares no code with the product."""
    return {name: value + eta * gradients[name] for name, value in params.items()}


def inner_trajectory(params: Params, difference_objective: Objective, eta: float, inner_steps: int) -> List[Params]:
    """[θ_0, θ_1, ..., θ_inner_steps]: `inner_steps` ascent steps on J, each from the last."""
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    trajectory = [params]
    for _ in range(inner_steps):
        trajectory.append(ascent_step(trajectory[-1], grad(difference_objective)(trajectory[-1]), eta))
    return trajectory


def first_order_meta_gradient(
    params: Params, difference_objective: Objective, preference_objective: Objective, eta: float, inner_steps: int
) -> Params:
    """DESIGN.md step 4, first order: ∇_θ' L_θ'(X_t), to be applied to θ (not to θ')."""
    adapted = inner_trajectory(params, difference_objective, eta, inner_steps)[-1]
    return grad(preference_objective)(adapted)


def second_order_meta_gradient(
    params: Params, difference_objective: Objective, preference_objective: Objective, eta: float, inner_steps: int
) -> Params:
    """The exact gradient ∇_θ L(θ'(θ)), differentiating through the unrolled ascent with torch.func."""

    def loss_after_ascent(theta: Params) -> torch.Tensor:
        for _ in range(inner_steps):
            theta = ascent_step(theta, grad(difference_objective)(theta), eta)
        return preference_objective(theta)

    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    return grad(loss_after_ascent)(params)
