"""The PPO learner on one rank in this process: passes and updates in micro-batches equal the whole batch's.

Two ranks against one, with micro-batches, run through real actors in tests/test_actors.py.
"""
import pytest
import torch

from rayrlhf.config import ModelSpec, PPOConfig, SyntheticTask
from rayrlhf.data.rollouts import Rollout
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.models.build import build_causal_lm, build_reward_model
from rayrlhf.training.ppo_learner import PPOLearner

pytestmark = pytest.mark.slow

ROWS = 8
LENGTHS = [2, 3, 1, 2, 9, 7, 11, 8]  # unequal lengths: micro-batches hold unequal token counts
SCORES = torch.tensor([0.5, -0.3, 0.9, 0.1, -0.7, 0.4, 0.2, -0.1])


def rollout_and_tokenizer():
    task = SyntheticPreferenceTask(SyntheticTask(num_prompts=400), seed=0)
    tokenizer = task.tokenizer()
    prompts = [text for _, text in task.prompts()[:4] for _ in range(2)]
    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(6, len(tokenizer), (n,), generator=generator).tolist() for n in LENGTHS]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return Rollout(prompts, prompt_ids, responses, [""] * ROWS, [[0.0] * n for n in LENGTHS], group_size=2), tokenizer


def learner(tokenizer, **sizes) -> PPOLearner:
    settings = PPOConfig(policy_lr=1e-3, critic_lr=1e-3, epochs=2, mini_batches=2, **sizes)
    spec = ModelSpec(source="tiny")
    ppo = PPOLearner(build_causal_lm(spec, tokenizer, seed=0), build_reward_model(spec, tokenizer, seed=1), settings,
                     micro_batch_size=ROWS // 2, pad_id=tokenizer.pad_token_id, device="cpu")
    ppo.gradient_norms = {"policy": [], "critic": []}
    for name in ("policy", "critic"):
        record_gradient_norms(getattr(ppo, name), ppo.gradient_norms[name])
    return ppo


def record_gradient_norms(engine, norms: list) -> None:
    """Append the accumulated gradient's norm at each optimizer step: Adam's update hides a wrong scale of
    the gradient (its first step is about lr·sign(g)), the norm does not."""
    step = engine.step

    def recording_step(*args, **kwargs):
        norms.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in engine.module.parameters()
                                    if p.grad is not None)).item())
        return step(*args, **kwargs)

    engine.step = recording_step


def ppo_step(**sizes):
    rollout, tokenizer = rollout_and_tokenizer()
    ppo = learner(tokenizer, **sizes)
    experience = ppo.experience(rollout, SCORES, kl_coefficient=0.05)
    trained = ppo.train(experience, seed=7)
    trained.update({f"{name}_gradient_norm_{i}": norm for name, norms in ppo.gradient_norms.items()
                    for i, norm in enumerate(norms)})
    weights = {f"policy.{n}": p.detach().clone() for n, p in ppo.policy.module.named_parameters()}
    weights.update({f"critic.{n}": p.detach().clone() for n, p in ppo.critic.module.named_parameters()})
    return experience, trained, weights


def test_ppo_step_in_micro_batches_equals_the_whole_mini_batch_step(distributed):
    """Mini-batches of 4 rows in micro-batches of 1 and of 3 (3 + 1), no-grad passes 2 and 5 rows at a time;
    and with the policy's and critic's activations recomputed in backward (gradient checkpointing)."""
    whole_experience, whole_trained, whole_weights = ppo_step()
    initial = learner(rollout_and_tokenizer()[1])
    moved = max((whole_weights[f"policy.{n}"] - p).abs().max().item() for n, p in initial.policy.module.named_parameters())
    assert moved > 1e-3  # the comparison is not between two unmoved models
    for micro, forward, checkpointing in ((1, 2, False), (3, 5, False), (3, None, True)):
        experience, trained, weights = ppo_step(micro_batch_size=micro, forward_micro_batch_size=forward,
                                                gradient_checkpointing=checkpointing)
        for name in ("old_log_probs", "values", "advantages", "returns", "kl", "entropy"):
            torch.testing.assert_close(getattr(experience, name), getattr(whole_experience, name), atol=1e-5, rtol=0)
        assert trained == pytest.approx(whole_trained, abs=1e-5)
        for name, tensor in whole_weights.items():
            torch.testing.assert_close(weights[name], tensor, atol=2e-5, rtol=0, msg=name)


def test_sft_step_in_micro_batches_equals_the_whole_batch_step(distributed):
    rollout, tokenizer = rollout_and_tokenizer()
    results = []
    for micro in (None, 3):
        ppo = learner(tokenizer, micro_batch_size=micro)
        loss = ppo.sft_step(rollout.prompt_ids, rollout.response_ids, lr=1e-2)["sft_loss"]
        results.append((loss, ppo.gradient_norms["policy"][0],
                        torch.cat([p.detach().flatten() for p in ppo.policy.module.parameters()])))
    (whole_loss, whole_norm, whole), (micro_loss, micro_norm, micro) = results
    assert micro_loss == pytest.approx(whole_loss, abs=1e-6)
    assert micro_norm == pytest.approx(whole_norm, rel=1e-5) and whole_norm > 0
    # Adam's first step is about lr·sign(g): a gradient that is float noise may flip, so 1% of lr
    torch.testing.assert_close(micro, whole, atol=1e-4, rtol=0)


def test_engine_log_probs_as_old_log_probs_give_the_trainer_pass_update(distributed):
    """ppo.old_log_probs=engine on a rollout whose engine log-probs are the trainer pass's own: the same update as
    the trainer pass gives; the first update's pass measures a mismatch of zero and the entropy of π_old."""
    rollout, tokenizer = rollout_and_tokenizer()
    trainer = learner(tokenizer)
    trainer_experience = trainer.experience(rollout, SCORES, kl_coefficient=0.05)
    trainer_trained = trainer.train(trainer_experience, seed=7)
    old = [row[:n].tolist() for row, n in zip(trainer_experience.old_log_probs, LENGTHS)]
    engine_rollout = Rollout(rollout.prompt_texts, rollout.prompt_ids, rollout.response_ids, rollout.response_texts, old, 2)
    engine = learner(tokenizer, old_log_probs="engine")
    experience = engine.experience(engine_rollout, SCORES, kl_coefficient=0.05)
    assert experience.entropy is None
    trained = engine.train(experience, seed=7)
    for name in ("advantages", "returns", "kl"):
        torch.testing.assert_close(getattr(experience, name), getattr(trainer_experience, name), atol=1e-6, rtol=0)
    for (name, tensor), other in zip(trainer.policy.module.named_parameters(), engine.policy.module.parameters()):
        torch.testing.assert_close(other, tensor, atol=1e-6, rtol=0, msg=name)
    assert trained["policy_loss"] == pytest.approx(trainer_trained["policy_loss"], abs=1e-6)
    assert trained["logprob_mismatch"] == pytest.approx(0.0, abs=1e-5)
    # the updates' entropy: the first at π_old, the second after one small step (lr 1e-3): near the trainer pass's
    summary = engine.summarise(experience, trained)
    trainer_entropy = trainer.summarise(trainer_experience, trainer_trained)["entropy"]
    assert summary["entropy"] == pytest.approx(trainer_entropy, rel=0.05) and summary["logprob_mismatch"] < 1e-5
