"""The two things a sweep can try, as Ray Tune function trainables. Each trial is a process of its own that
starts its actors in its own placement-group bundles (bundle 0 is the trial itself), so the DeepSpeed ranks
of one trial form their own process group on their own fresh port.

- `reward_model_trial`: the reward-model phase alone. The RewardLearner ranks of the Ray loop train on the
  fixed preference data, MetaRM with the fixed meta data (`data.meta`: a target domain's responses, or the
  samples a run saved with format `rollouts`); after every epoch the trial reports the held-out accuracy,
  the target-domain accuracy where labels exist and the reward-difference statistics on the meta data.
- `rlhf_trial`: the whole loop of `python -m rayrlhf.run` (its rounds are the budget), reporting per round.

Both report a Tune checkpoint after every report, so a trial stopped with the sweep resumes from it.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

import ray
from ray import tune
from ray.tune import Checkpoint, PlacementGroupFactory

from rayrlhf.actors.placement import bundle, bundles
from rayrlhf.checkpoints import read_files, write_files
from rayrlhf.config import RunConfig
from rayrlhf.tuning.sweep_config import trial_config

if TYPE_CHECKING:
    from rayrlhf.actors.reward_learner import RewardLearnerGroup

TIME_ATTRIBUTE = {"reward_model": "epoch", "rlhf": "round"}
"""The reported counter ASHA's rungs are measured in."""


def trial_resources(trainable: str, config: RunConfig, driver_cpus: float) -> PlacementGroupFactory:
    """Bundle 0 for the trial's own process, then one bundle per actor it starts."""
    resources = config.resources
    actors = [bundle(resources, "reward")] * resources.reward_learner_ranks if trainable == "reward_model" else bundles(resources)
    return PlacementGroupFactory([{"CPU": driver_cpus}] + actors, strategy=resources.strategy)


def budget(trainable: str, config: RunConfig) -> int:
    """Reports a trial makes when nothing stops it: ASHA's max_t."""
    return config.reward.epochs if trainable == "reward_model" else config.rounds


def _enter_trial(params: Dict[str, Any], base: RunConfig, working_dir: str) -> RunConfig:
    # Tune starts each trial inside its own folder; the config's relative paths (data, models) are relative
    # to where the sweep was started.
    os.chdir(working_dir)
    return trial_config(base, params, run_dir=str(Path(tune.get_context().get_trial_dir()) / "run"))


def reward_model_trial(params: Dict[str, Any], base: RunConfig, working_dir: str) -> None:
    config = _enter_trial(params, base, working_dir)
    # The RM phase trains on fixed meta data; the written best config keeps the base's meta_source.
    config = config.model_copy(update={"reward": config.reward.model_copy(update={"meta_source": "data"})})
    from rayrlhf.pipeline import start_reward_learner, train_reward_model_epochs

    def report_epoch(results: Dict[str, float], files: Dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            write_files(Path(folder) / "reward_model", files)
            (Path(folder) / "trial.json").write_text(json.dumps({"epoch": results["epoch"]}))
            tune.report(results, checkpoint=Checkpoint.from_directory(folder))

    learner = start_reward_learner(config, ray.util.get_current_placement_group(), first_bundle=1)
    try:
        learner.form_process_group()
        done = _restore_reward_model(learner)
        train_reward_model_epochs(learner, done + 1, config.reward.epochs, report_epoch)
    finally:
        for actor in learner.actors:  # no barrier first: after a failure a rank may be gone
            ray.kill(actor)


def _restore_reward_model(learner: "RewardLearnerGroup") -> int:
    """Load the trial's last Tune checkpoint into every rank; the epochs it holds (0 without one)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        learner.load_checkpoint_files(read_files(Path(folder) / "reward_model"))
        return json.loads((Path(folder) / "trial.json").read_text())["epoch"]


def rlhf_trial(params: Dict[str, Any], base: RunConfig, working_dir: str) -> None:
    """The Ray loop in the trial's bundles; its run dir (with its own checkpoints) is the trial's `run/`.
    A restored trial continues from that run dir's last checkpoint (resume=true)."""
    from rayrlhf.checkpoints import latest_checkpoint
    from rayrlhf.launch import launch

    config = _enter_trial(params, base, working_dir)
    config = config.model_copy(update={"resume": latest_checkpoint(Path(config.run_dir)) is not None})

    def report_round(summary: Dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "trial.json").write_text(json.dumps({"round": summary["round"]}))
            tune.report(dict(summary), checkpoint=Checkpoint.from_directory(folder))

    def report_all_but_the_last(summary: Dict[str, float]) -> None:
        if summary["round"] < config.rounds:
            report_round(summary)

    # The last round is reported once the run has written its final models and rounds.csv: Tune ends a
    # trial at its last report, before anything after it runs.
    history = launch(config, on_round=report_all_but_the_last, placement=ray.util.get_current_placement_group(),
                     first_bundle=1)
    report_round(history[-1])


TRAINABLES = {"reward_model": reward_model_trial, "rlhf": rlhf_trial}


def with_bundles(trainable: str, base: RunConfig, driver_cpus: float, working_dir: str):
    """The Tune trainable for `trainable`, with the base config bound and each trial's resources (from its
    own config, so a sweep over resources.* keys reserves what each trial needs)."""
    function = tune.with_parameters(TRAINABLES[trainable], base=base, working_dir=working_dir)
    return tune.with_resources(
        function, lambda params: trial_resources(trainable, trial_config(base, params, base.run_dir), driver_cpus))

