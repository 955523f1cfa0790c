"""Group invariant learning's math (rayrlhf/algos/group_invariant.py) against hand computations."""
import pytest
import torch

from rayrlhf.algos.group_invariant import (adaptive_kl_coefficients, group_means, group_sums, high_return_group,
                                           invariance_penalty, predictor_loss, variance_across_groups)

PROBS = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
RETURNS = torch.tensor([2.0, 4.0, 6.0])


def test_soft_group_returns_by_hand():
    sums, sizes = group_sums(RETURNS, PROBS)
    assert sums.tolist() == [2.0 + 2.0, 2.0 + 6.0] and sizes.tolist() == [1.5, 1.5]
    assert torch.allclose(group_means(sums, sizes), torch.tensor([4.0 / 1.5, 8.0 / 1.5]))


def test_variance_across_groups_by_hand():
    assert variance_across_groups(torch.tensor([1.0, 3.0])).item() == 1.0  # ((1-2)² + (3-2)²) / 2
    assert variance_across_groups(torch.tensor([2.0, 2.0, 5.0])).item() == pytest.approx(2.0)  # (1 + 1 + 4) / 3


def test_sums_reduced_over_two_halves_equal_the_whole_batch():
    """What the learner's all-reduce does across ranks: the sums of two halves give the whole batch's means."""
    first, second = group_sums(RETURNS[:2], PROBS[:2]), group_sums(RETURNS[2:], PROBS[2:])
    whole = group_means(*group_sums(RETURNS, PROBS))
    assert torch.allclose(group_means(first[0] + second[0], first[1] + second[1]), whole)


def test_predictor_loss_is_minus_beta_times_the_return_variance():
    means = torch.tensor([4.0 / 1.5, 8.0 / 1.5])
    expected = -0.5 * ((means[0] - means[1]) / 2) ** 2
    assert predictor_loss(RETURNS, PROBS, beta_critic=0.5).item() == pytest.approx(expected.item())


def test_a_predictor_step_increases_the_return_variance_on_two_return_levels():
    """Returns at two clearly different levels (0 and 5) and a predictor that starts undecided: one gradient step on
    predictor_loss separates them, so the variance across groups grows."""
    generator = torch.Generator().manual_seed(0)
    returns = torch.cat([torch.zeros(8), torch.full((8,), 5.0)])
    features = torch.cat([torch.full((8, 1), -1.0), torch.full((8, 1), 1.0)]) + 0.1 * torch.randn(16, 1, generator=generator)
    head = torch.nn.Linear(1, 2)
    torch.nn.init.normal_(head.weight, std=0.01, generator=generator)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)

    def variance() -> float:
        return variance_across_groups(group_means(*group_sums(returns, head(features).softmax(-1)))).item()

    before = variance()
    for _ in range(5):
        optimizer.zero_grad()
        predictor_loss(returns, head(features).softmax(-1), beta_critic=1.0).backward()
        optimizer.step()
    assert before < 0.01 and variance() > 1.0  # the groups now split the two levels (the most: (5/2)² = 6.25)


def test_the_invariance_penalty_gradient_matches_finite_differences():
    surrogate = torch.tensor([0.3, -0.2, 0.9, 0.1], dtype=torch.float64, requires_grad=True)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    invariance_penalty(surrogate, probs, beta_policy=2.0).backward()
    assert probs.grad is None  # p_φ is held fixed in the policy's penalty
    step = 1e-6
    for i in range(4):
        shifted = [surrogate.detach().clone() for _ in range(2)]
        shifted[0][i] += step
        shifted[1][i] -= step
        numeric = (invariance_penalty(shifted[0], probs.detach(), 2.0) - invariance_penalty(shifted[1], probs.detach(), 2.0)) / (2 * step)
        assert surrogate.grad[i].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


def test_the_adaptive_kl_strengthens_the_penalty_on_the_high_return_group():
    means = group_means(*group_sums(RETURNS, PROBS))
    high = high_return_group(means)
    assert high == 1
    coefficients = adaptive_kl_coefficients(0.05, PROBS[:, high], scale=1.0)
    assert torch.allclose(coefficients, torch.tensor([0.05, 0.075, 0.1]))
