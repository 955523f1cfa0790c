"""A run's reward models (initial: after the first training, before round 1; final) on named preference sets, and
the reward-difference distribution of each round's policy samples (the paper's Figure of r(x,s_i) - r(x,s_j))."""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rayrlhf.algos.rewards import same_prompt_differences
from rayrlhf.checkpoints import checkpoint_path
from rayrlhf.config import RunConfig
from rayrlhf.data.sources import load_preference_pairs, split_by_prompt
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.evaluation.scoring import pair_accuracy, score_responses
from rayrlhf.models.build import build_reward_model, load_tokenizer
from rayrlhf.training.safe_checkpoints import load_state


def load_reward_model(config: RunConfig, run_dir: Path, name: str) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`final` (run_dir/reward_model) or `initial` (the RM engine state in checkpoint round 0), with its tokenizer."""
    spec = config.reward_model.model_copy(update={"source": str(run_dir / "reward_model"), "tokenizer": None})
    tokenizer = load_tokenizer(spec)
    model = build_reward_model(spec, tokenizer)
    if name == "initial":
        state_file = checkpoint_path(run_dir, 0) / "reward_model" / "state" / "mp_rank_00_model_states.pt"
        module = load_state(str(state_file))["module"]  # the learner's RewardModule: keys start with "model."
        model.load_state_dict({key.removeprefix("model."): value for key, value in module.items()})
    elif name != "final":
        raise ValueError(f"unknown reward model {name!r}: `initial` or `final`")
    return model.to(config.resources.device).eval(), tokenizer


def preference_sets(config: RunConfig) -> Dict[str, datasets.Dataset]:
    """`held_out` (the preference data's evaluation split: in distribution), `target` (data.target_eval, or the
    synthetic task's gold-labelled drifted pairs: out of distribution), and evaluation.preference_sets."""
    data = config.data
    pairs = load_preference_pairs(data.preference, data.synthetic, config.seed).pairs
    sets = {"held_out": split_by_prompt(pairs, data.eval_fraction, config.seed)[1]}
    if data.target_eval is not None:
        sets["target"] = load_preference_pairs(data.target_eval, data.synthetic, config.seed).pairs
    elif data.preference.format == "synthetic":
        sets["target"] = SyntheticPreferenceTask(data.synthetic, config.seed).drifted_pairs()
    for name, source in config.evaluation.preference_sets.items():
        sets[name] = load_preference_pairs(source, data.synthetic, config.seed).pairs
    return sets


def set_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: datasets.Dataset,
                 config: RunConfig) -> float:
    """The RM's accuracy on every pair of a set."""
    limits = {"max_prompt_tokens": config.data.max_prompt_tokens, "max_response_tokens": config.data.max_response_tokens}
    chosen = score_responses(model, tokenizer, pairs["prompt"], pairs["chosen"], **limits)
    rejected = score_responses(model, tokenizer, pairs["prompt"], pairs["rejected"], **limits)
    return pair_accuracy(chosen, rejected)


def read_round_samples(run_dir: Path) -> Dict[int, List[dict]]:
    """Each round's meta samples (samples/round_NNNN_meta.jsonl): prompt, responses and, from runs that wrote them,
    `rewards` (the round's RM after its training) and `gold`."""
    rounds = {}
    for path in sorted((run_dir / "samples").glob("round_*_meta.jsonl")):
        rounds[int(path.name.split("_")[1])] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return rounds


def round_reward_differences(run_dir: Path, config: RunConfig, final_model=None, final_tokenizer=None
                             ) -> Dict[int, Tuple[torch.Tensor, str]]:
    """Per round: the reward differences of its meta samples, and which RM scored them (the round's own as the run
    recorded it; the final RM for runs that did not record scores, when it is given)."""
    limits = {"max_prompt_tokens": config.data.max_prompt_tokens, "max_response_tokens": config.data.max_response_tokens}
    differences = {}
    for round_index, groups in read_round_samples(run_dir).items():
        if all("rewards" in group for group in groups):
            rewards, scored_by = torch.tensor([group["rewards"] for group in groups], dtype=torch.float64), "the round's RM"
        elif final_model is not None:
            prompts = [group["prompt"] for group in groups for _ in group["responses"]]
            flat = score_responses(final_model, final_tokenizer, prompts, [r for g in groups for r in g["responses"]], **limits)
            rewards, scored_by = flat.double().view(len(groups), -1), "the final RM"
        else:
            continue
        differences[round_index] = (same_prompt_differences(rewards).flatten(), scored_by)
    return differences
