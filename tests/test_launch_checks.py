"""What launch checks before any actor starts (models whole, sequences within the models' positions), and what
it does not retry (an actor's constructor error)."""
import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from rayrlhf.config import ModelSpec, load_config
from rayrlhf.errors import ConfigError, ModelSourceError
from rayrlhf.launch import check_models, check_sequence_lengths, model_shapes, worth_a_restart
from rayrlhf.memory_plan import check_memory, estimate_actors
from rayrlhf.models.build import check_weights, save_model
from rayrlhf.pipeline import load_prompt_sets

from helpers import tiny_rm


@pytest.fixture
def model_folder(tmp_path):
    _, tokenizer = tiny_rm.task_and_tokenizer()
    save_model(tiny_rm.tiny_reward_model(tokenizer), tokenizer, tmp_path / "rm")
    return tmp_path / "rm"


def shapes_for(*overrides):
    config = load_config("conf/tiny.yaml", overrides)
    return config, model_shapes(config, check_models(config))


def test_prompt_and_response_past_the_policy_positions_are_refused_naming_both():
    config, shapes = shapes_for("policy.tiny.max_position_embeddings=20")
    with pytest.raises(ConfigError, match=r"^data.max_prompt_tokens \+ rollout.max_new_tokens = 22 tokens, but the policy "
                                          r"covers 20 positions"):
        check_sequence_lengths(config, shapes)
    check_sequence_lengths(*shapes_for("policy.tiny.max_position_embeddings=32"))  # 16 + 16 fits exactly


def test_the_reward_model_must_cover_the_longer_response_limit():
    config, shapes = shapes_for("reward_model.tiny.max_position_embeddings=40", "data.max_response_tokens=30")
    with pytest.raises(ConfigError, match=r"= 46 tokens, but the reward model covers 40 positions"):
        check_sequence_lengths(config, shapes)


def test_heads_that_do_not_divide_the_width_are_a_config_error():
    with pytest.raises(ConfigError, match=r"policy.tiny: hidden_size=64 must be divisible by num_heads=3"):
        load_config(None, ["policy.tiny.num_heads=3"])


def test_a_model_folder_without_weights_is_named(model_folder):
    (model_folder / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match=rf"model folder '{model_folder}' has no .safetensors weights"):
        check_weights(ModelSpec(source=str(model_folder)))


def test_a_cut_weight_file_is_named(model_folder):
    weights = model_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelSourceError, match=rf"weight file '{weights}' is damaged or cut short"):
        check_weights(ModelSpec(source=str(model_folder)))
    check_weights(ModelSpec(source="tiny"))  # nothing to read


def test_a_cut_reward_model_is_refused_by_launch_before_ray(model_folder, tmp_path):
    weights = model_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    config = load_config("conf/tiny.yaml", [f"reward_model.source={model_folder}"])
    with pytest.raises(ModelSourceError, match=rf"^reward_model: weight file '{weights}' is damaged"):
        check_models(config)


def test_an_actor_constructor_error_is_not_restarted_but_a_dead_process_is(tmp_path):
    try:
        raise ValueError("bad architecture")
    except ValueError as cause:
        task_error = RayTaskError("PPOTrainer.__init__", "Traceback ...", cause)
    died_in_constructor, died_running = ActorDiedError(task_error), ActorDiedError()
    assert died_in_constructor.actor_init_failed and not died_running.actor_init_failed
    assert not worth_a_restart(died_in_constructor, tmp_path, restarts=0, limit=2)
    assert worth_a_restart(died_running, tmp_path, restarts=0, limit=2)
    assert not worth_a_restart(died_running, tmp_path, restarts=2, limit=2)
    assert not worth_a_restart(died_running, None, restarts=0, limit=2)  # no checkpoint to restart from


def test_unbounded_sizes_are_refused_before_any_actor():
    """The issue's two: 100000 samples per prompt (took the machine from 15.7 to 2.2 GB free in 60 s) is refused by
    the memory estimate on a 24 GB machine; an SFT batch larger than the data by the sample-size check."""
    config, shapes = shapes_for("rollout.n_per_prompt=100000", "rollout.engine=hf")
    with pytest.raises(ConfigError, match=r"the actors would need about \d+\.\d GiB .* the node has 24\.0 GiB available"):
        check_memory(estimate_actors(config, shapes, "hf"), available_gb=24.0)
    with pytest.raises(ConfigError, match=r"^sft.batch_size=100000 but the training split of data.preference .* has 644 "):
        load_prompt_sets(load_config("conf/tiny.yaml", ["sft.batch_size=100000"]))


def test_bilevel_reward_learning_is_refused_by_the_loop_and_named(tmp_path):
    from rayrlhf.launch import check_reward_method, launch

    config = load_config("conf/tiny.yaml", ["reward.method=bilevel", "reward.bilevel.domain_by=topic", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^reward.method='bilevel' .* not in the round loop; meta-test"):
        launch(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    check_reward_method(load_config("conf/tiny.yaml", []))  # metarm passes
