"""Group invariant learning's math (rayrlhf/algos/group_invariant.py) against hand computations."""
import pytest
import torch

from rayrlhf.algos.group_invariant import (adaptive_kl_coefficients, group_means, group_sums, high_return_group,
                                           invariance_gradient_weights, predictor_gradient_weights, sequence_surrogates,
                                           invariance_penalty, predictor_loss, between_group_variance)

PROBS = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
RETURNS = torch.tensor([2.0, 4.0, 6.0])


def test_soft_group_returns_by_hand():
    sums, sizes = group_sums(RETURNS, PROBS)
    assert sums.tolist() == [2.0 + 2.0, 2.0 + 6.0] and sizes.tolist() == [1.5, 1.5]
    assert torch.allclose(group_means(sums, sizes), torch.tensor([4.0 / 1.5, 8.0 / 1.5]))


def test_between_group_variance_by_hand():
    # equal sizes: the plain variance of the means, ((1-2)² + (3-2)²) / 2
    assert between_group_variance(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])).item() == 1.0
    # sizes 3 and 1: overall mean (3·1 + 1·5)/4 = 2; (3/4)(1-2)² + (1/4)(5-2)² = 0.75 + 2.25
    assert between_group_variance(torch.tensor([1.0, 5.0]), torch.tensor([3.0, 1.0])).item() == pytest.approx(3.0)


def test_the_weighted_variance_prefers_a_balanced_split_to_an_outlier_group():
    """The reason for size weights: on 32 normal returns (a PPO batch's size here) the plain variance of the two means
    is larger with the lowest return alone in its group (1.20) than with the batch split at its median (0.71); the
    weighted one prefers the split (0.71 against 0.15)."""
    returns, _ = torch.sort(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    outlier = torch.tensor([[1.0, 0.0]] + [[0.0, 1.0]] * 31)
    halves = torch.tensor([[1.0, 0.0]] * 16 + [[0.0, 1.0]] * 16)

    def plain(probs):
        means = group_means(*group_sums(returns, probs))
        return ((means - means.mean()) ** 2).mean().item()

    def weighted(probs):
        sums, sizes = group_sums(returns, probs)
        return between_group_variance(group_means(sums, sizes), sizes).item()

    assert plain(outlier) > plain(halves) and weighted(halves) > weighted(outlier)


def test_sums_reduced_over_two_halves_equal_the_whole_batch():
    """What the learner's all-reduce does across ranks: the sums of two halves give the whole batch's means."""
    first, second = group_sums(RETURNS[:2], PROBS[:2]), group_sums(RETURNS[2:], PROBS[2:])
    whole = group_means(*group_sums(RETURNS, PROBS))
    assert torch.allclose(group_means(first[0] + second[0], first[1] + second[1]), whole)


def test_predictor_loss_is_minus_beta_times_the_return_variance():
    # group sums 4 and 8, sizes 1.5 each: means 8/3 and 16/3, overall 4, variance ((4/3)² + (4/3)²) / 2 = 16/9
    assert predictor_loss(RETURNS, PROBS, beta_critic=0.5).item() == pytest.approx(-0.5 * 16 / 9)


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
        sums, sizes = group_sums(returns, head(features).softmax(-1))
        return between_group_variance(group_means(sums, sizes), sizes).item()

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


def test_the_invariance_weights_give_the_penalty_gradient_autograd_gives():
    surrogate = torch.tensor([0.3, -0.2, 0.9, 0.1, 0.4], dtype=torch.float64, requires_grad=True)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]],
                         dtype=torch.float64)
    invariance_penalty(surrogate, probs, beta_policy=1.5).backward()
    weights = invariance_gradient_weights(*group_sums(surrogate.detach(), probs), beta_policy=1.5)
    assert torch.allclose(probs @ weights, surrogate.grad)


def test_the_predictor_weights_give_the_predictor_gradient_autograd_gives():
    returns = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    predictor_loss(returns, probs, beta_critic=0.7).backward()
    sums, sizes = group_sums(returns, probs.detach())
    weights = predictor_gradient_weights(returns, group_means(sums, sizes), sizes, beta_critic=0.7)
    # equal up to a term the same across a row's groups (autograd also moves N = Σ p, which rows summing to 1 fix;
    # the softmax that makes the probabilities removes such a term)
    assert torch.allclose(weights - weights.mean(1, keepdim=True), probs.grad - probs.grad.mean(1, keepdim=True))
    logits = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    predictor_loss(returns, logits.softmax(-1), beta_critic=0.7).backward()
    sums, sizes = group_sums(returns, logits.detach().softmax(-1))
    weights = predictor_gradient_weights(returns, group_means(sums, sizes), sizes, beta_critic=0.7)
    (through_softmax,) = torch.autograd.grad((logits.softmax(-1) * weights).sum(), logits)
    assert torch.allclose(through_softmax, logits.grad)


def test_sequence_surrogates_by_hand():
    log_probs = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios against old log-probs of 0
    advantages = torch.tensor([[1.0, 2.0], [-1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # row 0: min(1.5·1, 1.2·1) = 1.2 and 2.0 -> mean 1.6; row 1: min(0.5·-1, 0.8·-1) = -0.8, second token masked
    assert torch.allclose(sequence_surrogates(log_probs, torch.zeros(2, 2), advantages, mask, 0.2), torch.tensor([1.6, -0.8]))
