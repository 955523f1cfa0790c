"""Judge what a run made: its policies against the initial one, its reward models on preference sets, and the
reward-difference distribution of each round's policy samples.

    python -m rayrlhf.eval RUN_DIR [evaluation.prompts=128 evaluation.judge_model=FOLDER ...]

Reads RUN_DIR/config.yaml (overrides apply on top, e.g. any `evaluation.*` field of rayrlhf/config.py), runs in
this process on the run's device, and writes RUN_DIR/evaluation/: report.md, evaluation.json (every number),
win_rates.png and reward_differences.png. Bad input (no such run, an unfinished run, a missing judge folder)
is one `error:` paragraph and exit status 2.
"""
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from rayrlhf.cli import run_command_with
from rayrlhf.config import ModelSpec, RunConfig, load_config
from rayrlhf.errors import ConfigError
from rayrlhf.evaluation.diversity import diversity
from rayrlhf.evaluation.judging import Judge, build_judge, compare
from rayrlhf.evaluation.plots import plot_reward_difference_densities, plot_win_rates
from rayrlhf.evaluation.policies import (PolicySamples, checkpoint_policies, kl_estimate, length_statistics, load_policy,
                                         sample, sequence_log_probs)
from rayrlhf.evaluation.report import write_report, write_responses
from rayrlhf.evaluation.reward_models import load_reward_model, preference_sets, round_reward_differences, set_accuracy
from rayrlhf.models.build import load_tokenizer
from rayrlhf.seeds import evaluation_seed


def load_run(run_dir: str, overrides: List[str]) -> RunConfig:
    """The run's resolved config with `overrides`, after checking the run dir holds what evaluation reads."""
    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{run_dir!r} is not a run directory: it has no config.yaml (run `python -m rayrlhf.run` first)")
    missing = [name for name in ("reference", "reward_model") if not (folder / name / "config.json").is_file()]
    if missing:
        raise ConfigError(f"run directory {run_dir!r} has no {' or '.join(missing)}/ folder: the run has not finished "
                          "(finish it with resume=true, then evaluate)")
    return load_config(str(folder / "config.yaml"), [*overrides, f"run_dir={run_dir}"])


def judged_prompts(config: RunConfig, sets: Dict[str, Any]) -> List[str]:
    """The first evaluation.prompts distinct prompts of the set evaluation.prompt_set names: the held-out split by
    default (never trained on by RM or PPO), or e.g. the target domain's."""
    name = config.evaluation.prompt_set
    if name not in sets:
        raise ConfigError(f"evaluation.prompt_set={name!r} is not a preference set of this run; it has: {', '.join(sets)}")
    prompts = list(dict.fromkeys(sets[name]["prompt"]))[: config.evaluation.prompts]
    if len(prompts) < 2:
        raise ConfigError(f"the {name} set has {len(prompts)} prompt(s)"
                          + ("; raise data.eval_fraction" if name == "held_out" else ""))
    return prompts


def evaluate_policies(config: RunConfig, run_dir: Path, prompts: List[str], judge: Optional[Judge]
                      ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, PolicySamples]]:
    """Every policy's samples on the held-out prompts: judged against the initial policy's, KL to it, length,
    diversity. The initial policy's row has its own judged score, length and diversity. Returns the numbers and
    the samples, by policy."""
    evaluation, seed = config.evaluation, evaluation_seed(config.seed)
    tokenizer = load_tokenizer(ModelSpec(source=str(run_dir / "reference")))
    names = ["final"] if (run_dir / "policy" / "config.json").is_file() else []
    names = (checkpoint_policies(run_dir) if evaluation.checkpoint_rounds else []) + names
    initial = load_policy(config, run_dir, "initial")
    baseline = sample(initial, tokenizer, prompts, config, seed)
    results = {"initial": {**length_statistics(baseline), **diversity(baseline.responses, evaluation.embeddings)}}
    samples_by_policy = {"initial": baseline}
    if judge is not None:
        results["initial"]["judge_score"] = judge.score(baseline.prompts, baseline.responses).mean().item()
    for name in tqdm(names, desc="judging policies", file=sys.stderr, disable=len(names) < 2):
        policy = load_policy(config, run_dir, name)
        samples = sample(policy, tokenizer, prompts, config, seed)
        row = compare(judge, samples.prompts, samples.responses, baseline.responses, evaluation.tie_margin) if judge else {}
        row.pop("judge_score_baseline", None)
        row["kl_to_initial"] = kl_estimate(samples.log_probs, sequence_log_probs(initial, samples, tokenizer.pad_token_id))
        results[name] = {**row, **length_statistics(samples), **diversity(samples.responses, evaluation.embeddings)}
        samples_by_policy[name] = samples
    return results, samples_by_policy


def evaluate_reward_models(config: RunConfig, run_dir: Path, sets: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Accuracy of the initial and the final RM on every named preference set."""
    results = {}
    for name in ("initial", "final"):
        model, tokenizer = load_reward_model(config, run_dir, name)
        results[name] = {set_name: set_accuracy(model, tokenizer, pairs, config) for set_name, pairs in sets.items()}
    return results


def evaluate_run(config: RunConfig) -> Dict[str, Any]:
    """Everything report.md shows, as numbers; writes run_dir/evaluation/ too."""
    run_dir = Path(config.run_dir)
    torch.manual_seed(config.seed)
    sets = preference_sets(config)
    prompts = judged_prompts(config, sets)
    judge = build_judge(config)
    policies, samples = evaluate_policies(config, run_dir, prompts, judge)
    final_model, final_tokenizer = load_reward_model(config, run_dir, "final")
    differences = round_reward_differences(run_dir, config, final_model, final_tokenizer)
    results = {
        "run_dir": str(run_dir), "judge": judge.name if judge else None,
        "settings": {"prompts": len(prompts), "prompt_set": config.evaluation.prompt_set,
                     "samples_per_prompt": config.evaluation.samples_per_prompt,
                     "temperature": config.rollout.temperature, "top_p": config.rollout.top_p,
                     "seed": evaluation_seed(config.seed), "tie_margin": config.evaluation.tie_margin},
        "policies": policies,
        "reward_models": evaluate_reward_models(config, run_dir, sets),
        "preference_sets": {name: len(pairs) for name, pairs in sets.items()},
        "reward_differences": {str(r): {"variance": d.var(unbiased=False).item(), "mean_abs": d.abs().mean().item(),
                                        "pairs": d.numel(), "scored_by": scored_by}
                               for r, (d, scored_by) in sorted(differences.items())},
    }
    folder = run_dir / "evaluation"
    write_report(folder, results)
    write_responses(folder / "responses.jsonl", {name: zip(s.prompts, s.responses) for name, s in samples.items()})
    if any("win_rate" in values for values in policies.values()):
        plot_win_rates(policies, folder / "win_rates.png")
    if differences:
        plot_reward_difference_densities(differences, folder / "reward_differences.png")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    def job(config: RunConfig) -> None:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a "Loading weights" bar per model loaded
        evaluate_run(config)
        print(f"evaluation written to {Path(config.run_dir) / 'evaluation' / 'report.md'}")

    return run_command_with(__doc__, argv, load_run, job)


if __name__ == "__main__":
    sys.exit(main())
