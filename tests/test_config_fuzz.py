"""Bad config input as a new user or an adversary writes it: each is a ConfigError naming the culprit, never
another exception, and never a config that cannot be saved and read back."""
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rayrlhf.config import load_config, save_config
from rayrlhf.errors import ConfigError

from conftest import ROOT

TINY = (ROOT / "conf" / "tiny.yaml").read_bytes()
KEYS = ["rounds", "seed", "run_dir", "ppo", "ppo.policy_lr", "ppo.epochs", "reward.eta", "reward.method",
        "rollout.engine", "rollout.temperature", "resources.cpus_per_actor", "data.synthetic", "sft.lr", "policy.tiny"]


def error_for(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


@pytest.mark.parametrize("override", ["ppo.policy_lr=inf", "reward.eta=.inf", "ppo.kl_coef=.nan", "sft.lr=1e400",
                                      "rollout.temperature=-.inf", "resources.cpus_per_actor=inf"])
def test_non_finite_numbers_are_refused(override):
    key = override.partition("=")[0]
    message = error_for(override)
    assert f"{key}: Input should be a finite number" in message and f"[override {override!r}]" in message


def test_a_boolean_is_not_a_number():
    assert "rounds: expected a number, got true" in error_for("rounds=true")
    assert load_config(None, ["reward.reset_each_round=true"]).reward.reset_each_round is True


@pytest.mark.parametrize("override, problem", [("rounds=[1", "expected ',' or ']'"),
                                               ("rollout.engine=*hf", "undefined alias")])
def test_an_override_value_that_is_not_yaml_is_named(override, problem):
    message = error_for(override)
    assert message.startswith(f"override {override!r}: the value") and problem in message


def test_a_mapping_override_merges_into_its_section():
    config = load_config(str(ROOT / "conf" / "tiny.yaml"), ["ppo={epochs: 1}", "data={synthetic: {num_prompts: 50}}"])
    assert config.ppo.epochs == 1
    assert (config.ppo.policy_lr, config.ppo.steps_per_round) == (3.0e-4, 8)  # tiny.yaml's, not the schema's
    assert (config.data.synthetic.num_prompts, config.data.synthetic.topics_per_prompt) == (50, 6)


def test_the_error_says_whether_the_file_or_an_override_set_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rounds: 0\n")
    assert "[override 'seed=x']" in error_for("seed=x", path=str(config))
    assert f"rounds: Input should be greater than 0 (got 0) [in {config}]" in error_for(path=str(config))


def test_a_non_utf8_byte_is_named_with_its_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"rounds: 3\nrun_dir: runs/\xe9t\xe9\n")
    assert error_for(path=str(config)) == (f"config file {str(config)!r}, line 2: byte 0xe9 is not UTF-8 text; "
                                           "save the file as UTF-8")


def test_a_directory_is_not_a_config_file(tmp_path):
    assert "is a directory; give the YAML file inside it" in error_for(path=str(tmp_path))


def test_a_file_that_is_not_a_config_lists_a_few_problems(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("".join(f"key{i}: {i}\n" for i in range(20)))
    message = error_for(path=str(config))
    assert message.count("unknown key") == 5 and message.endswith("; and 15 more")


def _mutated(data: bytes, kind: str, position: int, payload: bytes) -> bytes:
    position %= len(data)
    if kind == "replace":
        return data[:position] + payload + data[position + len(payload):]
    if kind == "insert":
        return data[:position] + payload + data[position:]
    return data[:position]  # truncate


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["replace", "insert", "truncate", "override"]), position=st.integers(0, 10**6),
       payload=st.binary(min_size=1, max_size=8), key=st.sampled_from(KEYS),
       value=st.text(alphabet=st.characters(codec="utf-8"), max_size=12))
def test_fuzzed_configs_give_a_config_or_a_config_error(kind, position, payload, key, value):
    """300 mutations of conf/tiny.yaml (bytes replaced, inserted, the file cut, an override of any text): each
    loads to a RunConfig that saves and reads back unchanged, or is a ConfigError, never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(TINY if kind == "override" else _mutated(TINY, kind, position, payload))
        overrides = [f"{key}={value}"] if kind == "override" else []
        try:
            config = load_config(str(path), overrides)
        except ConfigError:
            return
        save_config(config, Path(folder) / "saved.yaml")
        assert load_config(str(Path(folder) / "saved.yaml")) == config
