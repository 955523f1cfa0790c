"""The memory estimates, by hand, and a config that cannot fit refused before any actor starts."""
import pytest

from rayrlhf.config import load_config
from rayrlhf.errors import ConfigError
from rayrlhf.memory import (ACTIVATION_FACTOR, GIB, PASS_OVERHEAD_GB, ModelShape, activation_bytes, gradient_bytes, logits_bytes,
                            optimizer_state_bytes)
from rayrlhf.memory_plan import ActorEstimate, check_memory, estimate_actors, node_peak_gb, reward_learner_estimate

SHAPE = ModelShape(parameters=10, layers=4, hidden=2, intermediate=3, heads=1, vocab=7, bytes_per_value=4)


def test_states_activations_and_logits_by_hand():
    assert optimizer_state_bytes(SHAPE) == 10 * (4 + 8) and gradient_bytes(SHAPE) == 10 * 4  # weights, Adam moments
    bf16 = ModelShape(10, 4, 2, 3, 1, 7, bytes_per_value=2)
    assert optimizer_state_bytes(bf16) == 10 * (2 + 8 + 4) and gradient_bytes(bf16) == 10 * 4  # and fp32 master weights
    # per sequence and layer: 5 tokens x (8 x 2 + 4 x 3) values + 2 x 1 head x 5² attention values, 4 bytes each
    per_layer = (5 * 28 + 50) * 4
    assert activation_bytes(SHAPE, sequences=2, tokens=5, checkpointing=False) == int(ACTIVATION_FACTOR * 2 * 4 * per_layer)
    # checkpointing keeps each layer's input (5 tokens x 2 hidden values) and one whole layer
    assert activation_bytes(SHAPE, 2, 5, checkpointing=True) == int(ACTIVATION_FACTOR * 2 * (4 * 10 * 4 + per_layer))
    assert logits_bytes(SHAPE, sequences=2, response_tokens=5) == 3 * 2 * 5 * 7 * 4


def test_the_reward_learner_sizes_its_pass_by_the_larger_of_its_pair_and_meta_micro_batches():
    config = load_config("conf/tiny.yaml", ["reward.batch_size=16", "reward.micro_batch_size=3", "reward.meta_batch_size=4",
                                            "reward.meta_micro_batch_size=2", "reward.samples_per_prompt=5"])
    estimate = reward_learner_estimate(config, SHAPE)
    tokens = config.data.max_prompt_tokens + config.data.max_response_tokens
    # 2 meta prompts x 5 responses = 10 sequences > 3 pairs x 2 = 6
    assert estimate.working["activations"] == pytest.approx(activation_bytes(SHAPE, 10, tokens, False) / GIB + PASS_OVERHEAD_GB)
    assert estimate.working["MetaRM's copy of θ"] == pytest.approx(40 / GIB)
    vanilla = reward_learner_estimate(config.model_copy(update={"reward": config.reward.model_copy(update={"method": "vanilla"})}), SHAPE)
    assert vanilla.working["activations"] == pytest.approx(activation_bytes(SHAPE, 6, tokens, False) / GIB + PASS_OVERHEAD_GB)


def test_actors_that_cannot_fit_are_refused_naming_the_largest_part_a_setting_lowers():
    """The node's peak: every actor's resident memory plus the largest working set (one phase at a time)."""
    worker = ActorEstimate("rollout worker", {"process": 1.0}, {"KV cache": 0.5}, {"KV cache": "rollout knob"})
    trainer = ActorEstimate("PPO trainer rank", {"process": 1.0, "states": 3.0}, {"activations and logits": 6.0},
                            {"activations and logits": "ppo knob"})
    assert node_peak_gb([worker, trainer]) == 1.0 + 4.0 + 6.0 and trainer.peak_gb == 10.0
    check_memory([worker, trainer], available_gb=11.6)  # 11.0 <= 0.95 x 11.6
    with pytest.raises(ConfigError) as refused:
        check_memory([worker, trainer, trainer], available_gb=11.6)  # 15.0
    message = str(refused.value)
    assert "about 15.0 GiB" in message and "PPO trainer rank 4.0 + 6.0" in message and "lower ppo knob" in message
    assert len(estimate_actors(load_config("conf/tiny.yaml", ["resources.ppo_ranks=2"]),
                               {"policy": SHAPE, "reward_model": SHAPE, "critic": SHAPE}, "vllm")) == 4
