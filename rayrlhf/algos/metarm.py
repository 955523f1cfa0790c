"""The MetaRM bilevel update (Algorithm 1 of Dou et al. 2024), on parameter dictionaries.

Notation (DESIGN.md): θ the reward-model parameters, J_θ(X_s) the difference loss on the meta batch,
L_θ(X_t) the Bradley-Terry loss on the preference batch, η the meta (ascent) learning rate.

    θ_0 = θ,   θ_{i+1} = θ_i + η ∇J(θ_i)   for i < inner_steps        (meta step, gradient ASCENT)
    first order:  g = ∇_θ' L(θ')  with θ' = θ_inner_steps   (applied to θ by the optimizer)
    second order: g = ∇_θ L(θ'(θ)) = Π_i (I + η H_J(θ_i)) ∇L(θ')   (exact; H_J the Hessian of J)

Functions here take `params: dict[str, Tensor]`, so they are testable on a two-parameter model by hand. The
DeepSpeed trainer (rayrlhf/training/reward_trainer.py) runs the update with them on an engine; the tests check
it against an independent torch.func reference of the whole update (tests/helpers/metarm_reference.py).
"""
from typing import Callable, Dict, List, Optional

import torch

Params = Dict[str, torch.Tensor]
HessianVectorProduct = Callable[[Params, Params], Params]


def ascent_step(params: Params, gradients: Params, eta: float) -> Params:
    """One meta step, DESIGN.md step 2: θ' = θ + η ∇_θ J_θ(X_s)."""
    return {name: value + eta * gradients[name] for name, value in params.items()}


def round_to_dtype(values: torch.Tensor, dtype: torch.dtype, stochastic: bool,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """float32 `values` (any shape) in `dtype`: to nearest (torch's cast), or, for bfloat16 with `stochastic`,
    up or down to one of the two neighbouring bfloat16 values with the probabilities that make the expected
    result exactly `values`.

    A bfloat16 is the top 16 bits of a float32. Adding a uniform random integer in [0, 2^16) to the low 16 bits
    and then dropping them rounds the magnitude up with probability (dropped bits) / 2^16. Rounded to nearest,
    a MetaRM ascent below half a bfloat16 unit vanishes (see ascent_kept); rounded stochastically, it
    survives in expectation."""
    if dtype != torch.bfloat16 or not stochastic:
        return values.to(dtype)
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


def ascent_sizes(before: torch.Tensor, after: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[⟨after − before, step⟩, ‖step‖²] in float32 for one tensor of one ascent step (any shape): how far it
    moved along η ∇J, and how far η ∇J meant to move it. Summed over tensors and steps, they are
    `ascent_kept`'s arguments."""
    moved, step = after.float() - before.float(), step.float()
    return torch.stack([(moved * step).sum(), step.square().sum()])


def ascent_kept(moved_along_step: float, step_squared: float) -> float:
    """The share of the ascent the parameters kept: ⟨θ' − θ, η ∇J⟩ / ‖η ∇J‖², from the two sums over every
    tensor and inner step (1 when nothing was intended).

    It falls below 1 when θ is stored in a narrow dtype and rounded to nearest. bfloat16 keeps 8 significant
    bits, so an η ∇J smaller than half a unit in the last place of θ rounds away: at the paper's η = 5e-6
    most of the step does, and the MetaRM step quietly becomes a vanilla one. Stochastic rounding
    (round_to_dtype) keeps it at 1 in expectation."""
    return moved_along_step / step_squared if step_squared > 0 else 1.0


def backprop_through_ascent(
    outer_gradient: Params, trajectory: List[Params], hessian_vector_product: HessianVectorProduct, eta: float
) -> Params:
    """The second-order gradient by reverse accumulation, for engines that cannot run torch.func:

        v_k = ∇L(θ_k);   v_i = v_{i+1} + η H_J(θ_i) v_{i+1}   for i = k-1 .. 0;   returns v_0.

    outer_gradient: ∇L at θ_k = trajectory[-1]. hessian_vector_product(θ_i, v) -> H_J(θ_i) v; a
    data-parallel caller averages it over ranks (it is linear in J, so the average is the global HVP).
    """
    vector = outer_gradient
    for theta in reversed(trajectory[:-1]):
        curvature = hessian_vector_product(theta, vector)
        vector = {name: vector[name] + eta * curvature[name] for name in vector}
    return vector
