"""Config validation: every bad input is one clear paragraph naming the key, raised before anything runs."""
import inspect
import subprocess
import sys

import pytest
from pydantic import BaseModel

import rayrlhf.config
from rayrlhf.config import load_config, save_config
from rayrlhf.errors import ConfigError

from conftest import DATA, ROOT, child_env


def error_for(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    return str(caught.value)


def test_defaults_validate_and_round_trip(tmp_path):
    config = load_config(None, ["reward.eta=1e-4", "reward.inner_steps=3", "seed=7"])
    assert (config.reward.eta, config.reward.inner_steps, config.seed) == (1e-4, 3, 7)
    save_config(config, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == config


def test_unknown_key_suggests_the_near_name():
    message = error_for("reward.inner_step=2")
    assert "unknown key 'reward.inner_step'" in message and "did you mean 'reward.inner_steps'" in message


def test_wrong_type_names_key_and_value():
    message = error_for("reward.alpha=fast")
    assert "reward.alpha" in message and "'fast'" in message


@pytest.mark.parametrize("override", ["reward.alpha=0", "reward.eta=-1e-5", "ppo.policy_lr=0", "reward.batch_size=0",
                                      "reward.meta_batch_size=-2"])
def test_non_positive_rates_and_batches(override):
    key, _, value = override.partition("=")
    message = error_for(override)
    assert key in message and "greater than 0" in message and value in message


def test_inner_steps_below_one():
    assert "reward.inner_steps" in error_for("reward.inner_steps=0")


def test_samples_per_prompt_below_two():
    assert "reward.samples_per_prompt" in error_for("reward.samples_per_prompt=1")


def test_missing_model_path():
    assert "./no/such/model" in error_for("reward_model.source=./no/such/model")


@pytest.mark.parametrize("name", ["tldr.yaml", "hh.yaml", "rm_tldr.yaml", "tldr_cpu.yaml", "hh_cpu.yaml"])
def test_real_data_configs_read_the_data_the_repository_ships(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths are taken from the current directory: the project root
    data = load_config(f"conf/{name}").data
    sources = [s for s in (data.preference, data.meta, data.meta_prompts, data.target_eval) if s is not None]
    assert len(sources) >= 2
    for source in sources:
        assert (ROOT / source.path).resolve().is_relative_to(DATA) and (ROOT / source.path).is_file()


def test_missing_data_file():
    message = error_for("data.preference.format=tldr", "data.preference.path=missing.jsonl")
    assert "data.preference" in message and "missing.jsonl" in message and "does not exist" in message


def test_batch_must_split_over_ranks():
    assert "divisible by resources.reward_learner_ranks=3" in error_for("resources.reward_learner_ranks=3")


def test_asynchronous_rollouts_get_the_truncated_importance_correction_unless_set(tmp_path):
    assert load_config(None, []).ppo.behaviour_ratio_cap is None
    assert load_config(None, ["rollout.asynchronous=true"]).ppo.behaviour_ratio_cap == 2.0
    config = load_config(None, ["rollout.asynchronous=true", "ppo.behaviour_ratio_cap=5"])
    assert config.ppo.behaviour_ratio_cap == 5.0
    save_config(config, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == config
    assert "behaviour_ratio_cap" in error_for("ppo.behaviour_ratio_cap=0.5")


def test_second_order_refuses_zero3():
    assert "ZeRO-3" in error_for("reward.order=second", "reward.zero_stage=3")


def test_override_into_a_value_is_an_error():
    assert "seed is a value" in error_for("seed=3", "seed.x=1")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


def test_command_line_exits_2_with_one_paragraph():
    """The CLI prints the culprit on stderr, no traceback, and exits non-zero, before any engine starts."""
    result = subprocess.run(
        [sys.executable, "-m", "rayrlhf.train_rm", "conf/rm_tiny.yaml", "reward.inner_stepz=2"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "did you mean 'reward.inner_steps'" in result.stderr and "Traceback" not in result.stderr


def test_command_line_names_the_bad_data_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    result = subprocess.run(
        [sys.executable, "-m", "rayrlhf.train_rm", "conf/rm_tiny.yaml", "data.preference.format=jsonl",
         f"data.preference.path={bad}", "reward.method=vanilla", "reward_model.source=minilm"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert f"{bad}:2: malformed JSON" in result.stderr and "Traceback" not in result.stderr


def test_rank_count_must_match_the_config():
    from rayrlhf.train_rm import train_reward_model

    with pytest.raises(ConfigError, match="started with 2 ranks but resources.reward_learner_ranks=1"):
        train_reward_model(load_config(None), rank=0, world_size=2)


def test_second_order_metarm_with_gradient_checkpointing_is_refused():
    with pytest.raises(ConfigError, match="reward.order='second' cannot run with reward.gradient_checkpointing"):
        load_config("conf/tiny.yaml", ["reward.order=second", "reward.gradient_checkpointing=true"])


def test_every_config_field_has_a_docstring():
    """Each field of each schema class has a docstring right under it, which pydantic reads as its description
    (use_attribute_docstrings): what it does, its unit, what its default or None means."""
    missing = []
    for name, cls in inspect.getmembers(rayrlhf.config, inspect.isclass):
        if not (issubclass(cls, BaseModel) and cls.__module__ == "rayrlhf.config"):
            continue
        declared = inspect.get_annotations(cls)  # the fields this class itself declares
        for field_name, field in cls.model_fields.items():
            if field_name not in declared:
                continue  # inherited: checked in the class that declares it
            if not (isinstance(field.description, str) and field.description.strip()):
                missing.append(f"{name}.{field_name}")
    assert not missing, f"{len(missing)} config fields without a docstring: {', '.join(missing)}"


def test_bilevel_domain_split_must_fit_the_preference_format():
    # `none` keeps the whole preference set as one domain, whatever its format (HH helpful has no sub-domains)
    config = load_config(ROOT / "conf" / "rm_hh.yaml", ["reward.method=bilevel", "reward.bilevel.domain_by=none"])
    assert config.reward.bilevel.domain_by == "none"
    message = error_for("reward.method=bilevel", "reward.bilevel.domain_by=subreddit")  # the synthetic task has none
    assert "reward.bilevel.domain_by='subreddit'" in message and "reward.bilevel.domains" in message
