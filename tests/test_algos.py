"""Tests of the pure-math layer, rayrlhf/algos: every expected value is worked out by hand in the test
(literal arithmetic) or by an independent plain implementation written here, never by the function itself.
"""
import math

import pytest
import torch
from torch.distributions import Normal

from helpers.metarm_reference import first_order_meta_gradient, inner_trajectory, second_order_meta_gradient
from rayrlhf.algos.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rayrlhf.algos.metarm import ascent_kept, ascent_sizes, ascent_step, backprop_through_ascent, round_to_dtype
from rayrlhf.algos.ppo import (
    clipped_policy_loss,
    truncated_importance_weights,
    clipped_value_loss,
    explained_variance,
    generalized_advantage_estimation,
)
from rayrlhf.algos.reward_losses import bradley_terry_loss, difference_loss, preference_accuracy
from rayrlhf.algos.rewards import (
    RunningRewardMoments,
    clip_rewards,
    normalize_rewards,
    reward_difference_statistics,
    token_level_rewards,
)


def gaussian_kl(mean_p: float, std_p: float, mean_q: float, std_q: float) -> float:
    """Closed-form KL(N(μp, σp²) || N(μq, σq²)), to check the sample estimators against."""
    return math.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# 1-2. Reward-model losses
# ----------------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_two_pairs():
    """Margins 0.5 and -0.5: loss = mean(log(1+e^-0.5), log(1+e^0.5))."""
    loss = bradley_terry_loss(t64([1.0, 0.2]), t64([0.5, 0.7]))
    assert_close(loss, (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 2)


def test_bradley_terry_loss_stays_finite_for_large_negative_margin():
    """Margin -200: -log σ(-200) = log(1+e^200) ≈ 200 (a naive log(sigmoid) would give inf)."""
    loss = bradley_terry_loss(t64([-100.0]), t64([100.0]))
    assert_close(loss, 200.0 + math.log1p(math.exp(-200.0)))


def test_preference_accuracy_counts_strict_wins_only():
    """Chosen > rejected in pair 1 only (pair 2 loses, pair 3 ties): accuracy 1/3."""
    accuracy = preference_accuracy(t64([1.0, 0.2, 0.3]), t64([0.5, 0.7, 0.3]))
    assert_close(accuracy, 1.0 / 3.0, rtol=1e-6)


def test_difference_loss_single_prompt_k3():
    """Rewards [0,1,3]: pairs |0-1|,|0-3|,|1-3| → (2/9)(σ(1)+σ(3)+σ(2))."""
    assert_close(difference_loss(t64([[0.0, 1.0, 3.0]])), (2 / 9) * (sig(1) + sig(3) + sig(2)))


def test_difference_loss_is_mean_over_prompts():
    """Second prompt [1,1,-1] has |d| = 0,2,2 → (2/9)(σ(0)+2σ(2)); the loss is the mean of both prompts."""
    first = (2 / 9) * (sig(1) + sig(3) + sig(2))
    second = (2 / 9) * (sig(0) + sig(2) + sig(2))
    assert_close(difference_loss(t64([[0.0, 1.0, 3.0], [1.0, 1.0, -1.0]])), (first + second) / 2)


@pytest.mark.parametrize("bad", [t64([[1.0], [2.0]]), t64([0.0, 1.0, 3.0])])
def test_difference_loss_rejects_k1_and_1d(bad):
    """k=1 (no pairs) or a 1-D tensor (no prompt axis) is a ValueError."""
    with pytest.raises(ValueError):
        difference_loss(bad)


# ----------------------------------------------------------------------------------------------------------
# 3. MetaRM on a two-parameter linear reward model r(x) = a*x1 + b*x2, θ = {"w": (a, b)}
# ----------------------------------------------------------------------------------------------------------

# Meta batch X_s: 1 prompt, k=3 responses with features S1, S2, S3; pairs i<j have D_ij = S_i - S_j, d_ij = θ·D_ij.
# (k=3, not 2: with one pair every H_J is a multiple of the same DDᵀ, so the H_J(θ_i) would commute and the
# order of the reverse accumulation in backprop_through_ascent could not be tested.)
S = ((1.0, 2.0), (0.5, -1.0), (-1.0, 0.5))
PAIRS = [(S[i][0] - S[j][0], S[i][1] - S[j][1]) for i, j in ((0, 1), (0, 2), (1, 2))]  # (0.5,3), (2,1.5), (1.5,-1.5)
# Preference batch X_t: 1 pair, chosen C, rejected U; M = C - U, m = θ·M.
C, U = (2.0, 0.5), (1.0, 1.5)
M = (C[0] - U[0], C[1] - U[1])  # (1.0, -1.0)
THETA = (0.3, -0.2)  # d = (-0.45, 0.3, 0.75): both signs, so sign(d) matters; m = 0.5
ETA = 0.5

META_FEATURES = t64([S])  # (P=1, k=3, 2)
CHOSEN, REJECTED = t64([C]), t64([U])  # (1, 2)


def J(params):
    """Difference objective on X_s through the library loss: (2/9) Σ_{i<j} σ(|θ·D_ij|)."""
    return difference_loss(META_FEATURES @ params["w"])


def L(params):
    """Bradley-Terry objective on X_t through the library loss: -log σ(θ·M)."""
    return bradley_terry_loss(CHOSEN @ params["w"], REJECTED @ params["w"])


def dot(u, v):
    return u[0] * v[0] + u[1] * v[1]


def hand_grad_J(theta):
    """∇J = (2/9) Σ_ij σ(|d|)(1-σ(|d|)) sign(d) D_ij."""
    g = [0.0, 0.0]
    for D in PAIRS:
        d = dot(theta, D)
        s = sig(abs(d))
        c = (2 / 9) * s * (1 - s) * math.copysign(1.0, d)
        g[0] += c * D[0]
        g[1] += c * D[1]
    return tuple(g)


def hand_hessian_J(theta):
    """H_J = (2/9) Σ_ij σ''(|d|) D_ij D_ijᵀ with σ'' = σ(1-σ)(1-2σ) (sign(d)² = 1)."""
    h = [[0.0, 0.0], [0.0, 0.0]]
    for D in PAIRS:
        s = sig(abs(dot(theta, D)))
        c = (2 / 9) * s * (1 - s) * (1 - 2 * s)
        for a in range(2):
            for b in range(2):
                h[a][b] += c * D[a] * D[b]
    return h


def hand_L(theta):
    return math.log(1 + math.exp(-dot(theta, M)))


def hand_grad_L(theta):
    """∇L = -(1-σ(m)) M."""
    c = -(1 - sig(dot(theta, M)))
    return (c * M[0], c * M[1])


def hand_ascent(theta, eta, steps):
    """Plain-Python θ_{i+1} = θ_i + η ∇J(θ_i), returning [θ_0, ..., θ_steps]."""
    trajectory = [tuple(theta)]
    for _ in range(steps):
        g = hand_grad_J(trajectory[-1])
        trajectory.append((trajectory[-1][0] + eta * g[0], trajectory[-1][1] + eta * g[1]))
    return trajectory


def params(theta=THETA):
    return {"w": t64(list(theta))}


def test_metarm_objectives_match_hand_values():
    """Sanity of the fixtures: d = (0.15-0.6, 0.6-0.3, 0.45+0.3), J = (2/9)Σσ(|d|); L = log(1+e^-0.5)."""
    assert_close(J(params()), (2 / 9) * (sig(0.45) + sig(0.3) + sig(0.75)))
    assert_close(L(params()), math.log(1 + math.exp(-0.5)))


def test_ascent_step_is_theta_plus_eta_hand_grad_J():
    """(a) θ' = θ + η∇J, ∇J = (2/9)[σ'(0.45)·(-1)·(0.5,3) + σ'(0.3)·(2,1.5) + σ'(0.75)·(1.5,-1.5)], σ' = σ(1-σ)."""

    def dsig(x):
        return sig(x) * (1 - sig(x))

    grad_j = (
        (2 / 9) * (-dsig(0.45) * 0.5 + dsig(0.3) * 2.0 + dsig(0.75) * 1.5),
        (2 / 9) * (-dsig(0.45) * 3.0 + dsig(0.3) * 1.5 - dsig(0.75) * 1.5),
    )
    assert_close(t64(list(hand_grad_J(THETA))), t64(list(grad_j)))  # the helper used below agrees
    expected = (0.3 + ETA * grad_j[0], -0.2 + ETA * grad_j[1])
    stepped = ascent_step(params(), {"w": t64(list(grad_j))}, ETA)
    assert_close(stepped["w"], t64(list(expected)))
    # the trajectory helper takes the same step with the autograd gradient of J
    assert_close(inner_trajectory(params(), J, ETA, 1)[1]["w"], t64(list(expected)))


def test_ascent_kept_by_hand_in_bfloat16_and_float32():
    """bfloat16 has 8 significant bits, so its values next to 1.0 are 2^-7 apart and, rounded to nearest, a
    step below 2^-8 vanishes: θ = (1, 1) with η∇J = (2^-6, 2^-9) lands on (1 + 2^-6, 1). Kept:
    2^-12 / (2^-12 + 2^-18) = 64 / 65. In float32 both steps land whole."""
    step = torch.tensor([2.0**-6, 2.0**-9])
    for dtype, expected in ((torch.bfloat16, 64 / 65), (torch.float32, 1.0)):
        before = torch.ones(2, dtype=dtype)
        after = round_to_dtype(before.float() + step, dtype, stochastic=False)
        moved_along_step, step_squared = ascent_sizes(before, after, step).tolist()
        assert step_squared == pytest.approx(2.0**-12 + 2.0**-18, rel=1e-6)
        assert ascent_kept(moved_along_step, step_squared) == pytest.approx(expected, rel=1e-6)
    assert ascent_kept(0.0, 0.0) == 1.0  # no ascent meant, none missed


def test_stochastic_rounding_to_bfloat16_is_right_in_expectation():
    """1 + 2^-9 lies a quarter of the way from 1 to the next bfloat16, 1 + 2^-7: it must round up a quarter of
    the time, so that the mean is 1 + 2^-9 (nearest rounding gives 1 every time); the same for its negative.
    200,000 draws: the share rounded up has a standard deviation of about 0.001."""
    generator = torch.Generator().manual_seed(0)
    for sign in (1.0, -1.0):
        values = torch.full((200_000,), sign * (1 + 2.0**-9))
        rounded = round_to_dtype(values, torch.bfloat16, stochastic=True, generator=generator)
        assert rounded.dtype == torch.bfloat16
        assert set(rounded.float().unique().tolist()) == {sign * 1.0, sign * (1 + 2.0**-7)}
        assert (rounded.float().abs() > 1).float().mean().item() == pytest.approx(0.25, abs=0.005)
        assert round_to_dtype(values, torch.bfloat16, stochastic=False).float().unique().tolist() == [sign * 1.0]
    exact = torch.tensor([1.5, -0.25, 3.0])  # already bfloat16 values: never moved
    assert torch.equal(round_to_dtype(exact, torch.bfloat16, True, generator).float(), exact)


def test_first_order_meta_gradient_is_grad_L_at_adapted_theta():
    """(b) first order = -(1-σ(m'))·M at θ' = θ + η∇J(θ) (one ascent step)."""
    adapted = hand_ascent(THETA, ETA, 1)[-1]
    gradient = first_order_meta_gradient(params(), J, L, ETA, inner_steps=1)
    assert_close(gradient["w"], t64(list(hand_grad_L(adapted))))
    # and it is not ∇L at the un-adapted θ (the ascent step matters)
    assert not torch.allclose(gradient["w"], t64(list(hand_grad_L(THETA))))


def test_three_inner_steps_equal_three_explicit_ascent_steps():
    """(c) inner_steps=3: trajectory and first-order gradient equal three hand ascent steps in a loop."""
    expected = hand_ascent(THETA, ETA, 3)
    trajectory = inner_trajectory(params(), J, ETA, 3)
    assert len(trajectory) == 4
    for got, want in zip(trajectory, expected):
        assert_close(got["w"], t64(list(want)))
    gradient = first_order_meta_gradient(params(), J, L, ETA, inner_steps=3)
    assert_close(gradient["w"], t64(list(hand_grad_L(expected[-1]))))


def test_second_order_one_step_matches_closed_form():
    """(d, closed form) inner_steps=1: ∇_θ L(θ'(θ)) = (I + η H_J(θ)) ∇L(θ'), H_J = ½σ''(|d|) DDᵀ."""
    adapted = hand_ascent(THETA, ETA, 1)[-1]
    g = hand_grad_L(adapted)
    h = hand_hessian_J(THETA)
    expected = (g[0] + ETA * (h[0][0] * g[0] + h[0][1] * g[1]), g[1] + ETA * (h[1][0] * g[0] + h[1][1] * g[1]))
    assert_close(second_order_meta_gradient(params(), J, L, ETA, 1)["w"], t64(list(expected)))


@pytest.mark.parametrize("inner_steps", [1, 2, 3])
def test_second_order_matches_central_finite_differences(inner_steps):
    """(d) ∂/∂θ_i L(θ'(θ)) ≈ [F(θ+ε e_i) - F(θ-ε e_i)] / 2ε, F = hand L after hand ascent, ε = 1e-6."""
    eps = 1e-6

    def F(theta):
        return hand_L(hand_ascent(theta, ETA, inner_steps)[-1])

    numeric = [
        (F((THETA[0] + eps, THETA[1])) - F((THETA[0] - eps, THETA[1]))) / (2 * eps),
        (F((THETA[0], THETA[1] + eps)) - F((THETA[0], THETA[1] - eps))) / (2 * eps),
    ]
    gradient = second_order_meta_gradient(params(), J, L, ETA, inner_steps)
    assert gradient["w"].dtype == torch.float64
    assert_close(gradient["w"], t64(numeric), rtol=1e-5, atol=1e-9)


def autograd_hvp(theta, vector):
    """H_J(θ) v by double backward with torch.autograd (no torch.func): ∇_θ (∇J(θ) · v)."""
    w = theta["w"].detach().clone().requires_grad_(True)
    (grad_j,) = torch.autograd.grad(J({"w": w}), w, create_graph=True)
    (hv,) = torch.autograd.grad(grad_j @ vector["w"].detach(), w)
    return {"w": hv}


def test_autograd_hvp_matches_hand_hessian():
    """The double-backward HVP used below equals the hand Hessian ½σ''(|d|)DDᵀ times v = (1, -2)."""
    h = hand_hessian_J(THETA)
    v = (1.0, -2.0)
    expected = (h[0][0] * v[0] + h[0][1] * v[1], h[1][0] * v[0] + h[1][1] * v[1])
    assert_close(autograd_hvp(params(), {"w": t64(list(v))})["w"], t64(list(expected)))


def test_backprop_through_ascent_equals_second_order_for_two_steps():
    """(e) v_2 = ∇L(θ_2) (hand), v_i = v_{i+1} + η H_J(θ_i) v_{i+1} (autograd HVP) equals the torch.func result."""
    trajectory = [params(theta) for theta in hand_ascent(THETA, ETA, 2)]
    outer = {"w": t64(list(hand_grad_L(trajectory[-1]["w"].tolist())))}
    reverse = backprop_through_ascent(outer, trajectory, autograd_hvp, ETA)
    exact = second_order_meta_gradient(params(), J, L, ETA, inner_steps=2)
    assert_close(reverse["w"], exact["w"], rtol=1e-10, atol=1e-12)


def test_hessians_along_the_trajectory_do_not_commute():
    """Fixture check: H_J(θ_0)H_J(θ_1) ≠ H_J(θ_1)H_J(θ_0), so the next test sees the accumulation order."""
    thetas = hand_ascent(THETA, ETA, 2)
    h0, h1 = t64(hand_hessian_J(thetas[0])), t64(hand_hessian_J(thetas[1]))
    assert (h0 @ h1 - h1 @ h0).abs().max() > 1e-6


def test_backprop_through_ascent_two_steps_by_hand():
    """(e, by hand) v_0 = (I+ηH(θ_0))(I+ηH(θ_1)) ∇L(θ_2) with the hand Hessians."""
    thetas = hand_ascent(THETA, ETA, 2)
    v = hand_grad_L(thetas[2])
    for theta in (thetas[1], thetas[0]):
        h = hand_hessian_J(theta)
        v = (v[0] + ETA * (h[0][0] * v[0] + h[0][1] * v[1]), v[1] + ETA * (h[1][0] * v[0] + h[1][1] * v[1]))
    trajectory = [params(theta) for theta in thetas]
    outer = {"w": t64(list(hand_grad_L(thetas[2])))}
    assert_close(backprop_through_ascent(outer, trajectory, autograd_hvp, ETA)["w"], t64(list(v)))


def test_first_order_differs_from_second_order_when_eta_positive():
    """(f) With one step they differ by η H_J(θ) ∇L(θ'), which is not ~0 here; with η = 0 both are ∇L(θ)."""
    first = first_order_meta_gradient(params(), J, L, ETA, 1)["w"]
    second = second_order_meta_gradient(params(), J, L, ETA, 1)["w"]
    assert (first - second).abs().max() > 1e-3
    first0 = first_order_meta_gradient(params(), J, L, 0.0, 1)["w"]
    second0 = second_order_meta_gradient(params(), J, L, 0.0, 1)["w"]
    assert_close(first0, t64(list(hand_grad_L(THETA))))
    assert_close(second0, t64(list(hand_grad_L(THETA))))


@pytest.mark.parametrize(
    "call",
    [
        lambda: inner_trajectory(params(), J, ETA, 0),
        lambda: first_order_meta_gradient(params(), J, L, ETA, 0),
        lambda: second_order_meta_gradient(params(), J, L, ETA, 0),
    ],
    ids=["trajectory", "first_order", "second_order"],
)
def test_zero_inner_steps_raises(call):
    """(g) inner_steps=0 is a ValueError."""
    with pytest.raises(ValueError):
        call()


# ----------------------------------------------------------------------------------------------------------
# 4-6. PPO
# ----------------------------------------------------------------------------------------------------------

GAMMA, LAM = 0.9, 0.8


def test_gae_three_tokens_by_hand():
    """δ = (1+0.9·0.4-0.5, 0+0.9·0.3-0.4, 2-0.3); A_2 = δ_2, A_t = δ_t + 0.72·A_{t+1}; returns = A + V."""
    delta2 = 2 - 0.3
    delta1 = 0 + 0.9 * 0.3 - 0.4
    delta0 = 1 + 0.9 * 0.4 - 0.5
    a2 = delta2
    a1 = delta1 + 0.9 * 0.8 * a2
    a0 = delta0 + 0.9 * 0.8 * a1
    advantages, returns = generalized_advantage_estimation(
        t64([[1.0, 0.0, 2.0]]), t64([[0.5, 0.4, 0.3]]), t64([[1.0, 1.0, 1.0]]), GAMMA, LAM
    )
    assert_close(advantages, t64([[a0, a1, a2]]))
    assert_close(returns, t64([[a0 + 0.5, a1 + 0.4, a2 + 0.3]]))


def test_gae_masked_row_is_zero_on_padding_and_equals_the_short_sequence():
    """Row 2 has mask [1,1,0] and garbage on the pad: A = (0.39 + 0.72·(-1.1), -1.1, 0), same as alone on 2 tokens."""
    rewards = t64([[1.0, 0.0, 2.0], [0.5, -1.0, 9.0]])
    values = t64([[0.5, 0.4, 0.3], [0.2, 0.1, 7.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = generalized_advantage_estimation(rewards, values, mask, GAMMA, LAM)

    b1 = -1.0 - 0.1  # last real token: no bootstrap from the padded value 7.0
    b0 = 0.5 + 0.9 * 0.1 - 0.2 + 0.9 * 0.8 * b1
    assert_close(advantages[1], t64([b0, b1, 0.0]))
    assert_close(returns[1], t64([b0 + 0.2, b1 + 0.1, 0.0]))

    alone_adv, alone_ret = generalized_advantage_estimation(
        t64([[0.5, -1.0]]), t64([[0.2, 0.1]]), t64([[1.0, 1.0]]), GAMMA, LAM
    )
    assert_close(advantages[1, :2], alone_adv[0])
    assert_close(returns[1, :2], alone_ret[0])
    # the full row is unaffected by its neighbour: same hand values as the 3-token test
    a2 = 1.7
    a1 = -0.13 + 0.72 * a2
    a0 = 0.86 + 0.72 * a1
    assert_close(advantages[0], t64([a0, a1, a2]))


def test_gae_against_plain_python_loop():
    """An independent per-row backward loop over a random masked batch gives the same advantages."""
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    lengths = [6, 4, 1, 3]
    mask = t64([[1.0 if t < n else 0.0 for t in range(6)] for n in lengths])
    advantages, returns = generalized_advantage_estimation(rewards, values, mask, GAMMA, LAM)
    for b, n in enumerate(lengths):
        r, v = rewards[b].tolist(), values[b].tolist()
        adv = [0.0] * 6
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + GAMMA * next_v - v[t] + GAMMA * LAM * running
            adv[t] = running
        assert_close(advantages[b], t64(adv))
        assert_close(returns[b], t64([adv[t] + v[t] if t < n else 0.0 for t in range(6)]))


def test_clipped_policy_loss_at_the_clip_boundaries():
    """ε=0.2, tokens (ρ, A): (1.1, 2) inside → 2.2; (1.5, +1) clipped → 1.2; (0.5, -1) clipped → 0.8·(-1);
    (1.5, -1) min picks unclipped → -1.5; a masked 5th token is ignored. loss = -(2.2+1.2-0.8-1.5)/4."""
    ratios = [1.1, 1.5, 0.5, 1.5, 3.0]
    advantages = t64([[2.0, 1.0, -1.0, -1.0, 5.0]])
    mask = t64([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old_log_probs = t64([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    log_probs = (old_log_probs + t64([[math.log(r) for r in ratios]])).requires_grad_(True)

    loss, metrics = clipped_policy_loss(log_probs, old_log_probs, advantages, mask, clip_range=0.2)
    assert_close(loss, -(2.2 + 1.2 - 0.8 - 1.5) / 4)
    assert_close(metrics["clip_fraction"], 2 / 4)
    approx_kl = sum((r - 1) - math.log(r) for r in ratios[:4]) / 4
    assert_close(metrics["approx_kl"], approx_kl)

    loss.backward()
    # d/dlogπ of -(1/4)·ρA is -(1/4)ρA on unclipped tokens; zero where the clipped (constant) term is taken
    expected_grad = [-(1 / 4) * 1.1 * 2.0, 0.0, 0.0, -(1 / 4) * 1.5 * -1.0, 0.0]
    assert_close(log_probs.grad, t64([expected_grad]))
    assert log_probs.grad[0, 1] == 0 and log_probs.grad[0, 2] == 0


def test_truncated_importance_weights_by_hand():
    """π_old / π_engine per token: e^(−1 − (−1.5)) = e^0.5 ≈ 1.65 kept; e^(−0.2 − (−1.5)) = e^1.3 ≈ 3.67 truncated to 2;
    e^(−2 − (−1)) = e^−1 kept; equal log-probs give 1."""
    old = t64([[-1.0, -0.2, -2.0, -0.7]])
    engine = t64([[-1.5, -1.5, -1.0, -0.7]])
    assert_close(truncated_importance_weights(old, engine, cap=2.0), t64([[math.exp(0.5), 2.0, math.exp(-1.0), 1.0]]))


def test_behaviour_weights_scale_each_tokens_surrogate_and_its_gradient():
    """The clipped-surrogate test's tokens with weights (0.5, 2, 1, 0): loss = -(0.5·2.2 + 2·1.2 - 0.8 + 0)/4; the
    gradient of an unclipped token is its weight times the unweighted one; weights 1 change nothing."""
    ratios = [1.1, 1.5, 0.5, 1.5]
    advantages = t64([[2.0, 1.0, -1.0, -1.0]])
    mask = t64([[1.0, 1.0, 1.0, 1.0]])
    old_log_probs = t64([[-1.0, -2.0, -0.5, -3.0]])
    log_probs = (old_log_probs + t64([[math.log(r) for r in ratios]])).requires_grad_(True)
    weights = t64([[0.5, 2.0, 1.0, 0.0]])

    loss, _ = clipped_policy_loss(log_probs, old_log_probs, advantages, mask, 0.2, behaviour_weights=weights)
    assert_close(loss, -(0.5 * 2.2 + 2 * 1.2 - 0.8 + 0.0) / 4)
    loss.backward()
    assert_close(log_probs.grad, t64([[-(1 / 4) * 0.5 * 1.1 * 2.0, 0.0, 0.0, 0.0]]))
    unweighted, _ = clipped_policy_loss(log_probs, old_log_probs, advantages, mask, 0.2)
    ones, _ = clipped_policy_loss(log_probs, old_log_probs, advantages, mask, 0.2, behaviour_weights=torch.ones_like(weights))
    assert ones.item() == unweighted.item()


def test_clipped_value_loss_by_hand():
    """ε=0.2: token 1 V=1.0, V_old=0.5, R=2 → clip V to 0.7, max(1.0², 1.3²)=1.69; token 2 unclipped 0.6² = 0.36.
    loss = ½·(1.69+0.36)/2, clip fraction 1/2."""
    values = t64([[1.0, 0.6]])
    old_values = t64([[0.5, 0.5]])
    returns = t64([[2.0, 0.0]])
    loss, metrics = clipped_value_loss(values, old_values, returns, t64([[1.0, 1.0]]), clip_range=0.2)
    assert_close(loss, 0.5 * ((0.7 - 2.0) ** 2 + (0.6 - 0.0) ** 2) / 2)
    assert_close(metrics["value_clip_fraction"], 0.5)


def test_clipped_value_loss_keeps_unclipped_error_when_larger():
    """V=0.2, V_old=0.5, R=2 (moved 0.3 away from R): clipped V=0.3 is closer, so max keeps (0.2-2)² = 3.24."""
    loss, _ = clipped_value_loss(t64([[0.2]]), t64([[0.5]]), t64([[2.0]]), t64([[1.0]]), clip_range=0.2)
    assert_close(loss, 0.5 * (0.2 - 2.0) ** 2)


def test_explained_variance():
    """Perfect predictions → 1; predicting the target mean → 0; targets 1..4 vs 1,2,3,3 → 1 - 0.1875/1.25."""
    targets = t64([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(targets)
    assert_close(explained_variance(targets.clone(), targets, mask), 1.0)
    assert_close(explained_variance(torch.full_like(targets, 2.5), targets, mask), 0.0)
    # residual (0,0,0,1): mean 0.25, var (3·0.25² + 0.75²)/4 = 0.1875; Var[target] = 1.25
    assert_close(explained_variance(t64([[1.0, 2.0, 3.0, 3.0]]), targets, mask), 1 - 0.1875 / 1.25)


# ----------------------------------------------------------------------------------------------------------
# 7-8. KL estimators and controllers
# ----------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    """log_ratio = (0.5, -1): k1 = lr, k2 = ½lr², k3 = e^{-lr} - 1 + lr."""
    log_probs, ref_log_probs = t64([[-1.0, -2.0]]), t64([[-1.5, -1.0]])
    assert_close(kl_estimate(log_probs, ref_log_probs, "k1"), t64([[0.5, -1.0]]))
    assert_close(kl_estimate(log_probs, ref_log_probs, "k2"), t64([[0.125, 0.5]]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert_close(kl_estimate(log_probs, ref_log_probs, "k3"), t64([k3]))


def test_gaussian_kl_closed_form():
    """KL(N(0,1)||N(0.5,1.2²)) = log 1.2 + (1 + 0.25)/(2·1.44) - ½; KL of a distribution with itself is 0."""
    assert_close(gaussian_kl(0.0, 1.0, 0.5, 1.2), math.log(1.2) + (1 + 0.25) / (2 * 1.44) - 0.5)
    assert_close(gaussian_kl(0.3, 2.0, 0.3, 2.0), 0.0)


def test_kl_estimators_are_unbiased_on_gaussians():
    """200000 draws x~N(0,1), log_ratio = log p(x) - log q(x): mean k1, mean k3 ≈ KL(p||q) within 0.01; k3 ≥ 0."""
    torch.manual_seed(0)
    p = Normal(t64(0.0), t64(1.0))
    q = Normal(t64(0.5), t64(1.2))
    x = p.sample((200000,))
    log_p, log_q = p.log_prob(x), q.log_prob(x)
    true_kl = math.log(1.2) + (1 + 0.25) / (2 * 1.44) - 0.5  # ≈ 0.1164
    k1 = kl_estimate(log_p, log_q, "k1")
    k3 = kl_estimate(log_p, log_q, "k3")
    assert abs(k1.mean().item() - true_kl) < 0.01
    assert abs(k3.mean().item() - true_kl) < 0.01
    assert (k3 >= 0).all()
    # k1 really is negative on some samples (why k3 exists)
    assert (k1 < 0).any()


def test_unknown_kl_estimator_raises():
    """Only k1, k2, k3 exist."""
    with pytest.raises(ValueError):
        kl_estimate(t64([[0.0]]), t64([[0.0]]), "k4")


def test_adaptive_kl_controller_updates():
    """β=0.1, target 6, horizon 10000, n=256: KL 12 → e=min(1, 0.2)=0.2; KL 3 → e=-0.2; KL 6.6 → e=0.1."""
    above = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    above.update(12.0, 256)
    assert above.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000), rel=1e-12)

    below = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    below.update(3.0, 256)
    assert below.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000), rel=1e-12)

    near = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    near.update(6.6, 256)
    assert near.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000), rel=1e-9)


def test_fixed_kl_controller_is_unchanged():
    """FixedKLController keeps β whatever KL it observes."""
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    fixed.update(0.0, 256)
    assert fixed.value == 0.05


# ----------------------------------------------------------------------------------------------------------
# 9. Reward shaping and diagnostics
# ----------------------------------------------------------------------------------------------------------


def test_clip_rewards():
    """Clip at 0.8: (-2, -0.5, 0.3, 1.5) → (-0.8, -0.5, 0.3, 0.8)."""
    assert_close(clip_rewards(t64([-2.0, -0.5, 0.3, 1.5]), 0.8), t64([-0.8, -0.5, 0.3, 0.8]))


def test_token_level_rewards():
    """β=0.5, scores (2, -1), mask row 2 = [1,1,0]: -β·kl on each real token, score added on the last real one."""
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = token_level_rewards(t64([2.0, -1.0]), kl, mask, kl_coefficient=0.5)
    expected = t64([
        [-0.5 * 0.1, -0.5 * 0.2, -0.5 * 0.3 + 2.0],
        [-0.5 * 0.4, -0.5 * 0.5 - 1.0, 0.0],
    ])
    assert_close(rewards, expected)


def test_reward_difference_statistics():
    """[[0,1,3]]: differences (-1,-3,-2), mean -2 → variance (1+1+0)/3, mean |d| = 2, 3 pairs."""
    stats = reward_difference_statistics(t64([[0.0, 1.0, 3.0]]))
    assert stats["reward_difference_variance"] == pytest.approx(2 / 3, rel=1e-12)
    assert stats["reward_difference_mean_abs"] == pytest.approx(2.0, rel=1e-12)
    assert stats["reward_difference_pairs"] == 3


def test_running_reward_moments_match_numpy_over_uneven_batches():
    batches = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([-3.0]), torch.tensor([0.5, 0.5, 7.0, -1.0])]
    moments = RunningRewardMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.count == 8
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std(unbiased=False).item())
    moments.reset()
    assert (moments.count, moments.mean, moments.std) == (0, 0.0, 1.0)


def test_normalize_rewards_by_hand():
    # mean 2, std 2: (0 - 2)/2 = -1, (4 - 2)/2 = 1, (5 - 2)/2 = 1.5
    assert normalize_rewards(torch.tensor([0.0, 4.0, 5.0]), 2.0, 2.0).tolist() == pytest.approx([-1.0, 1.0, 1.5])
