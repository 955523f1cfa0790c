"""The driver's prompt sets (rayrlhf/pipeline.py: load_prompt_sets): a sample larger than the data it is drawn
from is refused, naming the setting, before any actor starts (it was silently shrunk before)."""
import pytest

from rayrlhf.config import load_config
from rayrlhf.errors import ConfigError
from rayrlhf.pipeline import load_prompt_sets

SMALL = ["data.synthetic.num_prompts=40", "data.eval_fraction=0.25", "sft.batch_size=8"]


@pytest.mark.parametrize("setting", ["ppo.rollout_batch_size", "reward.meta_prompts_per_round", "sft.batch_size"])
def test_a_sample_larger_than_its_data_is_refused_naming_the_setting(setting):
    prompts = load_prompt_sets(load_config("conf/tiny.yaml", SMALL + ["ppo.rollout_batch_size=4"]))
    available = {"ppo.rollout_batch_size": len(prompts.train), "reward.meta_prompts_per_round": len(prompts.meta),
                 "sft.batch_size": len(prompts.sft)}[setting]
    assert 0 < available < 100  # the split of 40 prompts, 2 pairs each
    load_prompt_sets(load_config("conf/tiny.yaml", SMALL + [f"{setting}={available}"]))  # all of it: allowed
    with pytest.raises(ConfigError, match=rf"{setting}={available + 1} but .* has {available} to draw from"):
        load_prompt_sets(load_config("conf/tiny.yaml", SMALL + [f"{setting}={available + 1}"]))
