"""Bilevel reward learning for out-of-distribution preferences (Jia 2024, arXiv 2402.14760): the math.

Notation: φ the reward model's parameters, θ the policy's, π_ref the reference policy (θ_0, where the inner
problem starts), β the KL factor, γ the inner step size, K the inner steps. A domain gives n responses s_i to its
prompts x_i, sampled from π_ref (the inner problem's data, no labels), and P labelled pairs (x_j, y_wj, y_lj)
(the outer problem's data). Which parts are the paper's and which are reconstructed: docs/methods.md.

Inner problem: K steps of KL-regularised policy gradient against r_φ on the domain's samples,

    A_i(θ, φ) = a_i − mean of a over x_i's samples,   a_i = r_φ(x_i, s_i) − β (log π_θ(s_i|x_i) − log π_ref(s_i|x_i))
    G(θ, φ)   = (1/n) Σ_i A_i(θ, φ) ∇_θ log π_θ(s_i|x_i)          (the score-function gradient, A_i as weights)
    θ_{k+1}   = θ_k + γ G(θ_k, φ)

Outer problem: the domain's labels through the adapted policy's implicit reward,

    m_j(θ) = β [(log π_θ(y_wj) − log π_ref(y_wj)) − (log π_θ(y_lj) − log π_ref(y_lj))]
    L(φ)   = −(1/P) Σ_j log σ(m_j(θ_K(φ)))

Hypergradient. Exact, by reverse accumulation through the unroll (`unrolled_hypergradient`, small models):

    v_K = ∇_θ L(θ_K);   v_k = (I + γ ∂G/∂θ(θ_k))ᵀ v_{k+1};   dL/dφ = γ Σ_{k<K} (∂G/∂φ(θ_k))ᵀ v_{k+1}

At scale, first order in the unroll (v_{k+1} ≈ v_K, exact for K = 1). Since ∂A_i/∂φ = ∇_φ r_i − mean over x_i's
samples of ∇_φ r,  (∂G/∂φ)ᵀ v = (1/n) Σ_i ∇_φ r_i (c_i − c̄(x_i)) with c_i = ⟨∇_θ log π_θ(s_i|x_i), v⟩, so

    dL/dφ ≈ ∇_φ Σ_i w_i r_φ(x_i, s_i),   w_i = (γ/n) Σ_{k<K} (c_ik − c̄_k(x_i)),   c_ik = ⟨∇_θ log π_θk(s_i|x_i), v_K⟩

(`hypergradient_weights`): the RM's outer step is a weighted reward gradient over the domain's samples, each
weight the directional derivative of that sample's log-probability along the outer gradient — how much more
reward on s_i would have moved the adapted policy towards the domain's labels.

Shapes: n samples, P pairs; `prompt_index` (n,) the prompt of each sample (integers 0..X-1). Parameters are
dictionaries of tensors (`Params`), the models callables of them, so a test can check everything on a model
small enough to write out by hand.
"""
from typing import Callable, Dict, List, Optional

import torch

from rayrlhf.algos.reward_losses import bradley_terry_loss

Params = Dict[str, torch.Tensor]
SampleLogProbs = Callable[[Params], torch.Tensor]  # θ -> (n,) log π_θ(s_i | x_i)
PairLogProbs = Callable[[Params], torch.Tensor]  # θ -> (P, 2) log π_θ of (y_w, y_l)
Rewards = Callable[[Params], torch.Tensor]  # φ -> (n,) r_φ(x_i, s_i)


def centred_by_prompt(values: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    """values (n,) minus the mean of the values that share their prompt: v_i − mean_{j: x_j = x_i} v_j, (n,)."""
    prompts = int(prompt_index.max()) + 1
    sums = torch.zeros(prompts, dtype=values.dtype, device=values.device).index_add(0, prompt_index, values)
    counts = torch.zeros(prompts, dtype=values.dtype, device=values.device).index_add(0, prompt_index, torch.ones_like(values))
    return values - (sums / counts)[prompt_index]


def inner_advantages(rewards: torch.Tensor, log_probs: torch.Tensor, reference_log_probs: torch.Tensor,
                     prompt_index: torch.Tensor, beta: float) -> torch.Tensor:
    """A_i = a_i − mean_{x_i} a with a_i = r_i − β (log π_θ(s_i) − log π_ref(s_i)): the KL-regularised reward of
    each sample, its prompt's mean subtracted (a baseline that leaves the expected gradient unchanged). All (n,)."""
    return centred_by_prompt(rewards - beta * (log_probs - reference_log_probs), prompt_index)


def implicit_reward_margins(chosen_log_probs: torch.Tensor, rejected_log_probs: torch.Tensor,
                            reference_chosen_log_probs: torch.Tensor, reference_rejected_log_probs: torch.Tensor,
                            beta: float) -> torch.Tensor:
    """m_j = β [(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))], (P,): the policy's implicit
    reward difference of each labelled pair (0 at θ = θ_ref)."""
    return beta * ((chosen_log_probs - reference_chosen_log_probs) - (rejected_log_probs - reference_rejected_log_probs))


def outer_preference_loss(margins: torch.Tensor) -> torch.Tensor:
    """L = −(1/P) Σ_j log σ(m_j): the Bradley-Terry loss (reward_losses.bradley_terry_loss) of the labels under the
    implicit reward, whose margin m_j is the chosen-minus-rejected reward difference; a scalar."""
    return bradley_terry_loss(margins, torch.zeros_like(margins))


def hypergradient_weights(score_projections: torch.Tensor, prompt_index: torch.Tensor, step_size: float,
                          total_samples: Optional[int] = None) -> torch.Tensor:
    """w_i = (γ/n) Σ_k (c_ik − c̄_k(x_i)), (n,): the weights of the first-order hypergradient ∇_φ Σ_i w_i r_φ(s_i).
    score_projections (K, n) or (n,): c_ik = ⟨∇_θ log π_θk(s_i|x_i), v_K⟩ at each inner step's parameters.
    total_samples: n, where these samples are one rank's share of the step's (default: these n)."""
    projections = score_projections.reshape(-1, score_projections.shape[-1])
    samples = total_samples or projections.shape[-1]
    return step_size / samples * sum(centred_by_prompt(row, prompt_index) for row in projections)


def inner_step(theta: Params, phi: Params, sample_log_probs: SampleLogProbs, reference_log_probs: torch.Tensor,
               rewards: Rewards, prompt_index: torch.Tensor, beta: float, step_size: float,
               differentiable: bool) -> Params:
    """θ + γ G(θ, φ). differentiable: keep the graph to θ and φ (the exact hypergradient differentiates through
    it); else a plain step on detached tensors."""
    log_probs = sample_log_probs(theta)
    advantages = inner_advantages(rewards(phi), log_probs, reference_log_probs, prompt_index, beta)
    names = list(theta)
    # Σ_i (A_i / n) ∇_θ log π_θ(s_i): A_i enters as the vector of the vector-Jacobian product, so with
    # create_graph the result stays differentiable in A (hence in φ) without A's own θ-gradient in G
    gradients = torch.autograd.grad(log_probs, [theta[name] for name in names], grad_outputs=advantages / log_probs.numel(),
                                    create_graph=differentiable)
    stepped = {name: theta[name] + step_size * gradient for name, gradient in zip(names, gradients)}
    return stepped if differentiable else {name: value.detach().requires_grad_() for name, value in stepped.items()}


def unroll(theta: Params, phi: Params, steps: int, differentiable: bool, **inner) -> List[Params]:
    """[θ_0, θ_1, .., θ_K]: the inner problem's trajectory (`inner`: inner_step's other arguments)."""
    trajectory = [theta]
    for _ in range(steps):
        trajectory.append(inner_step(trajectory[-1], phi, differentiable=differentiable, **inner))
    return trajectory


def outer_loss_at(theta: Params, pair_log_probs: PairLogProbs, reference_pair_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """L at policy parameters θ: outer_preference_loss of the implicit reward margins of the labelled pairs."""
    pairs = pair_log_probs(theta)
    margins = implicit_reward_margins(pairs[:, 0], pairs[:, 1], reference_pair_log_probs[:, 0], reference_pair_log_probs[:, 1], beta)
    return outer_preference_loss(margins)


def unrolled_hypergradient(theta: Params, phi: Params, steps: int, pair_log_probs: PairLogProbs,
                           reference_pair_log_probs: torch.Tensor, **inner) -> Params:
    """dL/dφ exactly, by backpropagation through the K unrolled inner steps (memory grows with K and the policy's
    size: for small models and tests). theta and phi: leaf tensors with requires_grad."""
    trajectory = unroll(theta, phi, steps, differentiable=True, **inner)
    loss = outer_loss_at(trajectory[-1], pair_log_probs, reference_pair_log_probs, inner["beta"])
    names = list(phi)
    return dict(zip(names, torch.autograd.grad(loss, [phi[name] for name in names])))


def first_order_hypergradient(theta: Params, phi: Params, steps: int, pair_log_probs: PairLogProbs,
                              reference_pair_log_probs: torch.Tensor, **inner) -> Params:
    """The at-scale approximation on a small model: θ_K by plain steps, v_K = ∇_θ L(θ_K), c_ik by one gradient per
    sample, the weights of hypergradient_weights, then ∇_φ Σ_i w_i r_φ(s_i). Per-sample gradients make this a
    reference, not the scalable path (which takes c_ik as a directional derivative of the log-probabilities)."""
    trajectory = unroll(theta, phi, steps, differentiable=False, **inner)
    names = list(theta)
    loss = outer_loss_at(trajectory[-1], pair_log_probs, reference_pair_log_probs, inner["beta"])
    outer_gradient = torch.autograd.grad(loss, [trajectory[-1][name] for name in names])
    projections = torch.stack([score_projections(parameters, inner["sample_log_probs"], names, outer_gradient)
                               for parameters in trajectory[:-1]])
    weights = hypergradient_weights(projections, inner["prompt_index"], inner["step_size"])
    phi_names = list(phi)
    weighted_reward = (weights * inner["rewards"](phi)).sum()
    return dict(zip(phi_names, torch.autograd.grad(weighted_reward, [phi[name] for name in phi_names])))


def score_projections(theta: Params, sample_log_probs: SampleLogProbs, names: List[str],
                      direction: List[torch.Tensor]) -> torch.Tensor:
    """c_i = ⟨∇_θ log π_θ(s_i|x_i), v⟩ for every sample, (n,), one backward pass per sample (small models)."""
    log_probs = sample_log_probs(theta)
    projections = []
    for i in range(log_probs.numel()):
        gradients = torch.autograd.grad(log_probs[i], [theta[name] for name in names], retain_graph=True)
        projections.append(sum((g * v).sum() for g, v in zip(gradients, direction)))
    return torch.stack(projections)
