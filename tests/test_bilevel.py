"""The bilevel reward-learning math (rayrlhf/algos/bilevel.py) against hand computations and finite differences,
on a policy and a reward model small enough to write out: two prompts, three candidate responses each, a
log-linear policy over the candidates and a one-hidden-layer reward."""
import math

import pytest
import torch

from rayrlhf.algos.bilevel import (centred_by_prompt, first_order_hypergradient, hypergradient_weights,
                                   implicit_reward_margins, inner_advantages, outer_loss_at, outer_preference_loss,
                                   unroll, unrolled_hypergradient)

BETA = 0.5


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Finite differences need float64's digits; the default dtype is restored for the other modules' tests."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_centring_by_prompt_subtracts_each_prompts_mean():
    values = torch.tensor([1.0, 2.0, 3.0, 5.0, 10.0])
    assert torch.allclose(centred_by_prompt(values, torch.tensor([0, 0, 1, 1, 1])), torch.tensor([-0.5, 0.5, -3.0, -1.0, 4.0]))


def test_inner_advantages_by_hand():
    rewards, log_probs, reference = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    # a = r − β (log π − log π_ref) = [1 − 0.5, 0 − 0] = [0.5, 0]; one prompt: centred [0.25, −0.25]
    assert torch.allclose(inner_advantages(rewards, log_probs, reference, torch.tensor([0, 0]), BETA), torch.tensor([0.25, -0.25]))


def test_implicit_margins_and_the_outer_loss_by_hand():
    margins = implicit_reward_margins(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                                      torch.tensor([-1.5, -2.0]), BETA)
    # β [(−1 + 1.5) − (−2 + 1.5)] = 0.5; β [(−3 + 2) − (−1 + 2)] = −1
    assert torch.allclose(margins, torch.tensor([0.5, -1.0]))
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(1.0)))) / 2
    assert outer_preference_loss(margins).item() == pytest.approx(expected)
    assert outer_preference_loss(torch.zeros(3)).item() == pytest.approx(math.log(2))  # the reference policy


def test_hypergradient_weights_by_hand():
    projections = torch.tensor([[1.0, 3.0, 2.0, 2.0], [0.0, 2.0, 4.0, 0.0]])  # K = 2 steps, n = 4, prompts 0 0 1 1
    # centred per prompt: step 0 [−1, 1, 0, 0], step 1 [−1, 1, 2, −2]; summed [−2, 2, 2, −2]; × γ/n = 0.1/4
    weights = hypergradient_weights(projections, torch.tensor([0, 0, 1, 1]), step_size=0.1)
    assert torch.allclose(weights, torch.tensor([-0.05, 0.05, 0.05, -0.05]))


class SmallProblem:
    """Two prompts with three candidate responses each, feature vectors f(x, y) in R^4 and g(x, y) in R^3.
    Policy: log π_θ(y|x) = θ·f(x, y) − log Σ_y' exp θ·f(x, y'). Reward: r_φ(x, y) = v · tanh(U g(x, y)).
    Six samples (each candidate once), two labelled pairs per prompt."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.policy_features = torch.randn(2, 3, 4, generator=generator)
        self.reward_features = torch.randn(2, 3, 3, generator=generator)
        self.theta = {"theta": (0.3 * torch.randn(4, generator=generator)).requires_grad_()}
        self.phi = {"U": torch.randn(5, 3, generator=generator).requires_grad_(), "v": torch.randn(5, generator=generator).requires_grad_()}
        self.samples = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])  # (prompt, candidate)
        self.pairs = torch.tensor([[0, 2, 0], [0, 1, 0], [1, 0, 2], [1, 0, 1]])  # (prompt, chosen, rejected)

    def log_probs(self, theta):
        return torch.log_softmax(self.policy_features @ theta["theta"], dim=-1)  # (2 prompts, 3 candidates)

    def sample_log_probs(self, theta):
        return self.log_probs(theta)[self.samples[:, 0], self.samples[:, 1]]

    def pair_log_probs(self, theta):
        table = self.log_probs(theta)
        return torch.stack([table[self.pairs[:, 0], self.pairs[:, 1]], table[self.pairs[:, 0], self.pairs[:, 2]]], dim=1)

    def rewards(self, phi):
        features = self.reward_features[self.samples[:, 0], self.samples[:, 1]]  # (n, 3)
        return torch.tanh(features @ phi["U"].T) @ phi["v"]

    def arguments(self, step_size: float):
        with torch.no_grad():
            reference_samples, reference_pairs = self.sample_log_probs(self.theta), self.pair_log_probs(self.theta)
        inner = dict(sample_log_probs=self.sample_log_probs, reference_log_probs=reference_samples, rewards=self.rewards,
                     prompt_index=self.samples[:, 0], beta=BETA, step_size=step_size)
        return dict(pair_log_probs=self.pair_log_probs, reference_pair_log_probs=reference_pairs, **inner)

    def outer_loss(self, phi, steps: int, step_size: float) -> float:
        """L(φ) = L(θ_K(φ)) by plain inner steps: what the hypergradient differentiates."""
        arguments = self.arguments(step_size)
        pair_log_probs, reference_pairs = arguments.pop("pair_log_probs"), arguments.pop("reference_pair_log_probs")
        final = unroll(self.theta, phi, steps, differentiable=False, **arguments)[-1]
        return outer_loss_at(final, pair_log_probs, reference_pairs, BETA).item()


def flat(parameters):
    return torch.cat([value.reshape(-1) for value in parameters.values()])


@pytest.mark.parametrize("steps", [1, 3])
def test_the_unrolled_hypergradient_matches_central_finite_differences(steps):
    problem = SmallProblem()
    exact = flat(unrolled_hypergradient(problem.theta, problem.phi, steps, **problem.arguments(step_size=0.5)))
    numeric, epsilon = [], 1e-6
    for name, value in problem.phi.items():
        for index in range(value.numel()):
            shifted = []
            for sign in (1, -1):
                moved = {key: tensor.detach().clone().requires_grad_() for key, tensor in problem.phi.items()}
                with torch.no_grad():
                    moved[name].view(-1)[index] += sign * epsilon
                shifted.append(problem.outer_loss(moved, steps, step_size=0.5))
            numeric.append((shifted[0] - shifted[1]) / (2 * epsilon))
    assert exact.abs().max() > 1e-3  # the labels do depend on the reward through the inner problem
    assert torch.allclose(exact, torch.tensor(numeric), rtol=1e-5, atol=1e-8)


def test_the_first_order_hypergradient_is_exact_for_one_inner_step():
    problem = SmallProblem(seed=1)
    exact = flat(unrolled_hypergradient(problem.theta, problem.phi, 1, **problem.arguments(step_size=0.5)))
    approximate = flat(first_order_hypergradient(problem.theta, problem.phi, 1, **problem.arguments(step_size=0.5)))
    assert torch.allclose(approximate, exact, rtol=1e-9, atol=1e-12)


def test_the_first_order_error_over_several_steps_shrinks_with_the_step_size():
    """Dropping the unroll's Jacobian costs O(γ): the relative error at γ/10 is about a tenth of that at γ."""
    problem, errors = SmallProblem(seed=2), []
    for step_size in (0.5, 0.05):
        exact = flat(unrolled_hypergradient(problem.theta, problem.phi, 4, **problem.arguments(step_size)))
        approximate = flat(first_order_hypergradient(problem.theta, problem.phi, 4, **problem.arguments(step_size)))
        errors.append(((approximate - exact).norm() / exact.norm()).item())
    assert 0 < errors[1] < errors[0] / 5


def test_a_step_along_the_hypergradient_lowers_the_outer_loss():
    problem = SmallProblem(seed=3)
    gradient = unrolled_hypergradient(problem.theta, problem.phi, 3, **problem.arguments(step_size=0.5))
    stepped = {name: (value - 0.1 * gradient[name]).detach().requires_grad_() for name, value in problem.phi.items()}
    assert problem.outer_loss(stepped, 3, 0.5) < problem.outer_loss(problem.phi, 3, 0.5)
