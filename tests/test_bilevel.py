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


@pytest.mark.parametrize("policy_layers", [None, 1])
def test_the_policy_side_on_a_tiny_llama_gives_the_exact_one_step_hypergradient(policy_layers):
    """BilevelPolicy (central differences on a transformers policy) times the RM's reward gradient equals
    unrolled_hypergradient (backpropagation through the inner step) on tiny random Llamas; with policy_layers the
    inner problem adapts the last block and the final norm only, and the exact unroll moves those alone."""
    from torch.func import functional_call

    from rayrlhf.config import ModelSpec, SyntheticTask
    from rayrlhf.data.rollouts import collate_sequences
    from rayrlhf.data.synthetic import SyntheticPreferenceTask
    from rayrlhf.models.build import build_causal_lm, build_reward_model
    from rayrlhf.training.bilevel_policy import BilevelPolicy
    from rayrlhf.training.bilevel_training import adapt_last_layers
    from rayrlhf.training.ppo_passes import sequence_log_probs

    task = SyntheticPreferenceTask(SyntheticTask(relevance="any"), seed=0)
    tokenizer = task.tokenizer()
    policy = build_causal_lm(ModelSpec(), tokenizer, seed=0).double()
    policy.set_attn_implementation("eager")  # the exact unroll differentiates a backward pass
    if policy_layers:
        adapt_last_layers(policy, policy_layers)
        adapted = {name for name, p in policy.named_parameters() if p.requires_grad}
        assert adapted == {n for n, _ in policy.named_parameters() if n.startswith(("model.layers.1.", "model.norm."))}
    reward_model = build_reward_model(ModelSpec(), tokenizer, seed=1).double()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [encode(text) for _, text in task.prompts()[:2]]
    responses = [encode(text) for text in ("t1 w2 t3", "w4 w4", "t5", "t6 t7 w1", "w9 t2", "t3 t3 t3 w8")]
    samples = collate_sequences([prompts[i // 3] for i in range(6)], responses, tokenizer.pad_token_id)
    prompt_index = torch.tensor([0, 0, 0, 1, 1, 1])
    chosen = collate_sequences(prompts, [encode("t1 t2 t4"), encode("t5 t6")], tokenizer.pad_token_id)
    rejected = collate_sequences(prompts, [encode("w1 w2"), encode("w3 w3 w3")], tokenizer.pad_token_id)

    def rewards(phi):
        return functional_call(reward_model, phi, (samples.input_ids,), {"attention_mask": samples.attention_mask}).logits[:, 0]

    phi = {name: value.detach().clone().requires_grad_() for name, value in reward_model.named_parameters()}
    theta = {name: value.detach().clone().requires_grad_() for name, value in policy.named_parameters() if value.requires_grad}

    def sample_log_probs(parameters):
        return _log_probs(policy, parameters, samples)

    def pair_log_probs(parameters):
        return torch.stack([_log_probs(policy, parameters, chosen), _log_probs(policy, parameters, rejected)], dim=1)

    with torch.no_grad():
        reference_samples, reference_pairs = sample_log_probs(theta), pair_log_probs(theta)
    exact = unrolled_hypergradient(theta, phi, 1, pair_log_probs=pair_log_probs, reference_pair_log_probs=reference_pairs,
                                   sample_log_probs=sample_log_probs, reference_log_probs=reference_samples, rewards=rewards,
                                   prompt_index=prompt_index, beta=BETA, step_size=2.0)

    side = BilevelPolicy(policy, beta=BETA, inner_lr=2.0)
    weights, losses = side.sample_weights(samples, prompt_index, rewards(phi).detach(), chosen, rejected, 6, 2)
    weighted = torch.autograd.grad((weights * rewards(phi)).sum(), list(phi.values()))
    # central differences through a model that normalises in float32 (transformers' RMSNorm): 3e-4 measured
    error = (flat(dict(zip(phi, weighted))) - flat(exact)).norm() / flat(exact).norm()
    assert error < 1e-3 and flat(exact).abs().max() > 1e-6, error
    assert losses["outer_loss_before"] == pytest.approx(math.log(2))
    # the policy is back at θ_0
    assert all(torch.equal(p, r) for p, r in zip(side.parameters, side.reference))
    assert torch.allclose(sequence_log_probs(policy, samples), reference_samples)


def _log_probs(policy, parameters, batch):
    """log π(response | prompt) per row with the policy called on `parameters` (torch.func), written out
    independently of rayrlhf's response_log_probs."""
    from torch.func import functional_call

    logits = functional_call(policy, parameters, (batch.input_ids,), {"attention_mask": batch.attention_mask, "use_cache": False}).logits
    at_responses = logits.gather(1, batch.response_positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    token_log_probs = torch.log_softmax(at_responses, dim=-1).gather(-1, batch.response_tokens.unsqueeze(-1)).squeeze(-1)
    return (token_log_probs * batch.response_mask).sum(dim=1)


def test_a_pairs_domain_is_its_subreddit_or_its_topic_group():
    from rayrlhf.data.domains import pair_domain

    post = "SUBREDDIT: r/relationships\nTITLE: a title\nPOST: text\nTL;DR:"
    assert pair_domain(post, "subreddit", 4) == "relationships"
    assert pair_domain("ARTICLE: some news\nTL;DR:", "subreddit", 4) == "cnndm"
    assert pair_domain("Q: t13 t2 t7 A:", "topic", 4) == "topics1"
    assert pair_domain("\n\nHuman: hi\n\nAssistant:", "none", 4) == "all"


def test_a_domain_is_halved_into_support_and_query_prompts_and_a_small_one_is_left_out(caplog):
    from rayrlhf.data.domains import halve

    rows = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "chosen": f"a{i}{j}", "rejected": f"b{i}{j}"}
            for i in range(6) for j in range(2)]
    domain = halve("d", rows, min_prompts=4, samples_per_prompt=3, seed=0)
    support = {group["prompt"] for group in domain.support}
    query = {pair["prompt"] for pair in domain.query}
    assert len(support) == 3 and len(query) == 3 and not support & query
    assert all(len(group["responses"]) == 3 for group in domain.support) and len(domain.query) == 6
    assert halve("small", rows[:6], min_prompts=4, samples_per_prompt=3, seed=0) is None
    assert "domain 'small' left out: 3 prompt(s)" in caplog.text


def test_the_rm_step_follows_the_weighted_reward_gradient_over_micro_batches(distributed, monkeypatch):
    """weighted_reward_step accumulates ∇_φ Σ_i w_i r_φ(s_i) over micro-batches of one prompt: the same gradient
    as one backward pass over the whole batch, computed here directly."""
    from rayrlhf.config import ModelSpec, SyntheticTask
    from rayrlhf.data.batches import collate_groups, collate_pairs
    from rayrlhf.data.synthetic import SyntheticPreferenceTask
    from rayrlhf.models.build import build_reward_model
    from rayrlhf.models.heads import reward_scores
    from rayrlhf.training.reward_trainer import RewardModelTrainer

    torch.set_default_dtype(torch.float32)  # DeepSpeed's engine and the fused AdamW want float32 here
    try:
        tokenizer = SyntheticPreferenceTask(SyntheticTask(), seed=0).tokenizer()
        ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        groups = [[ids("Q: t1 A: t1 w2"), ids("Q: t1 A: w3")], [ids("Q: t4 A: t4 t5 t6"), ids("Q: t4 A: w1 w1")]]
        samples = collate_groups(groups, tokenizer.pad_token_id)
        pairs = collate_pairs([ids("Q: t1 A: t1")], [ids("Q: t1 A: w1")], tokenizer.pad_token_id)
        weights = torch.tensor([0.5, -0.5, -1.0, 1.0])
        reference = build_reward_model(ModelSpec(), tokenizer, seed=3)
        expected = torch.autograd.grad((weights * reward_scores(reference, samples.input_ids, samples.attention_mask)).sum(),
                                       list(reference.parameters()))
        trainer = RewardModelTrainer(build_reward_model(ModelSpec(), tokenizer, seed=3), alpha=1e-3, eta=1e-3, inner_steps=1,
                                     order="first", micro_batch_size=None, meta_micro_batch_size=1, zero_stage=0)
        monkeypatch.setattr(trainer.engine, "step", lambda: None)  # keep the accumulated gradient to read it
        values = trainer.weighted_reward_step(samples, weights, pairs, pairs_weight=0.0)
        gradients = [p.grad for p in trainer.engine.module.model.parameters()]
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(gradients, expected))
        scores = reward_scores(reference, samples.input_ids, samples.attention_mask)
        assert values["weighted_reward"] == pytest.approx((weights * scores).sum().item(), abs=1e-5)

        # with vanilla_weight 0.5 the Bradley-Terry loss of the step's pairs joins the objective
        pair_scores = reward_scores(reference, pairs.input_ids, pairs.attention_mask)
        joint = (weights * reward_scores(reference, samples.input_ids, samples.attention_mask)).sum() \
            - 0.5 * torch.nn.functional.logsigmoid(pair_scores[0] - pair_scores[1])
        expected = torch.autograd.grad(joint, list(reference.parameters()))
        trainer.engine.zero_grad()
        values = trainer.weighted_reward_step(samples, weights, pairs, pairs_weight=0.5)
        gradients = [p.grad for p in trainer.engine.module.model.parameters()]
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(gradients, expected))
        assert values["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(pair_scores[0] - pair_scores[1]).item(), abs=1e-5)
    finally:
        torch.set_default_dtype(torch.float64)


def test_a_domain_split_that_does_not_fit_the_data_is_refused_naming_both():
    from rayrlhf.config import load_config
    from rayrlhf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"reward.bilevel.domain_by='subreddit' splits tldr data, but data.preference has "
                                          r"format 'synthetic': name the domains in reward.bilevel.domains instead"):
        load_config("conf/rm_tiny.yaml", ["reward.method=bilevel"])
    load_config("conf/rm_tiny.yaml", ["reward.method=bilevel", "reward.bilevel.domain_by=topic"])
    load_config("conf/rm_tldr.yaml", ["reward.method=bilevel"])


def test_a_named_domain_that_is_the_preference_data_leaves_its_held_out_prompts_out():
    """A bilevel domain named by the same source as data.preference keeps to its training split: the RM's held-out
    accuracy is measured on prompts bilevel training never saw; another source's domain keeps every prompt."""
    from rayrlhf.config import load_config
    from rayrlhf.data.domains import named_domains
    from rayrlhf.data.sources import load_preference_pairs, split_by_prompt

    config = load_config("conf/rm_tiny.yaml", ["reward.method=bilevel", "reward.bilevel.domain_by=topic"])
    data, bilevel = config.data, config.reward.bilevel
    other = data.preference.model_copy(update={"max_records": 40})  # not applied to synthetic: the same pairs, unequal source
    bilevel = bilevel.model_copy(update={"domains": {"same": data.preference, "other": other}, "min_prompts": 2})
    same, other_domain = named_domains(data, bilevel, 2, config.seed)
    pairs = load_preference_pairs(data.preference, data.synthetic, config.seed).pairs
    train, held_out = split_by_prompt(pairs, data.eval_fraction, config.seed)
    seen = {group["prompt"] for group in same.support} | {pair["prompt"] for pair in same.query}
    assert held_out.num_rows > 0 and seen == set(train["prompt"])
    assert {pair["prompt_id"] for pair in same.query}.isdisjoint(held_out["prompt_id"])
    other_seen = {group["prompt"] for group in other_domain.support} | {pair["prompt"] for pair in other_domain.query}
    assert other_seen == set(pairs["prompt"])
