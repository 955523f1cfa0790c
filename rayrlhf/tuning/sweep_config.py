"""A sweep file: a base run config, a search space over its keys, and how Ray Tune searches it.

    base: rm_tldr.yaml                  # a run config, relative to this file
    config: ["reward.epochs=3"]         # overrides of the base, as on the command line
    trainable: reward_model             # or `rlhf`: the whole loop with a small budget
    space:
      reward.eta: {loguniform: [1.0e-6, 1.0e-3]}
      reward.inner_steps: {grid: [1, 2]}
    metric: eval_accuracy
    mode: max

Everything is checked here, before Ray starts: each space key must be a run-config key, each of its
values must make a valid run config, and the metric must be one the trainable reports.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, Tuple

from pydantic import Field, ValidationError, field_validator, model_validator

from rayrlhf.config import (RunConfig, Schema, _fields_at, apply_overrides, describe_validation_error, load_config,
                            read_yaml_mapping)
from rayrlhf.errors import ConfigError
from rayrlhf.launch import check_reward_method

DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}
"""Distribution name -> number of arguments (None: a non-empty list of values)."""


class SearchConfig(Schema):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    """`random` samples num_samples points (grid keys are crossed with them), `grid` tries every grid point
    once, `optuna` is Optuna's TPE (install optuna; no grid keys)."""
    seed: int = 0


class SchedulerConfig(Schema):
    name: Literal["asha", "fifo"] = "asha"
    """`asha` stops trials whose metric is below the best at a rung; `fifo` runs every trial to the end."""
    grace_period: int = Field(1, ge=1)
    """Reports (epochs or rounds) a trial gets before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(Schema):
    base: str
    config: List[str] = []
    trainable: Literal["reward_model", "rlhf"] = "reward_model"
    space: Dict[str, Dict[str, Any]]
    metric: str = "eval_accuracy"
    mode: Literal["max", "min"] = "max"
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    num_samples: int = Field(4, ge=1)
    max_concurrent: int = Field(2, ge=1)
    driver_cpus: float = Field(0.1, gt=0)
    """CPUs each trial's driver process reserves, beside the bundles of the actors it starts (the base
    config's `resources` say those: cpus_per_actor, gpus_per_actor, reward_learner_ranks, ...)."""
    storage_path: str = "runs/sweeps"
    name: str = "metarm"
    resume: bool = False
    """Continue the sweep stored at storage_path/name: unfinished trials go on, finished ones are kept."""

    @field_validator("space")
    @classmethod
    def _distributions_well_formed(cls, space: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        if not space:
            raise ValueError("the search space is empty; give at least one key, e.g. reward.eta: {loguniform: [1e-6, 1e-3]}")
        for key, distribution in space.items():
            if len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {distribution!r}")
            (kind, arguments), = distribution.items()
            count = DISTRIBUTIONS[kind]
            if not isinstance(arguments, list) or not arguments or (count is not None and len(arguments) != count):
                shape = "[low, high]" if count else "a non-empty list of values"
                raise ValueError(f"space.{key}: {kind} takes {shape}, got {arguments!r}")
            if kind == "loguniform" and not 0 < arguments[0] < arguments[1]:
                raise ValueError(f"space.{key}: loguniform needs 0 < low < high, got {arguments!r}")
        return space

    @model_validator(mode="after")
    def _algorithm_fits_space(self):
        kinds = {next(iter(d)) for d in self.space.values()}
        if self.search.algorithm == "grid" and kinds != {"grid"}:
            raise ValueError("search.algorithm=grid needs every space key to be a grid")
        if self.search.algorithm == "optuna" and "grid" in kinds:
            raise ValueError("search.algorithm=optuna cannot search grid keys; use choice instead")
        return self


def space_points(distribution: Dict[str, Any]) -> List[Any]:
    """Values that bound a distribution (its ends, or every listed value): each must give a valid config."""
    (arguments,) = distribution.values()
    return list(arguments)


def trial_config(base: RunConfig, params: Dict[str, Any], run_dir: str) -> RunConfig:
    """`base` with the trial's sampled values (dotted key -> value) and its own run_dir."""
    raw = base.model_dump(mode="json")
    overrides = [f"{key}={json.dumps(value)}" for key, value in params.items()] + [f"run_dir={json.dumps(run_dir)}"]
    try:
        return RunConfig.model_validate(apply_overrides(raw, overrides))
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, None, overrides)) from None


def check_space_keys(space: Dict[str, Dict[str, Any]]) -> None:
    """ConfigError naming a space key that is not a run-config key (with the keys its section has)."""
    for key in space:
        parts = key.split(".")
        known = _fields_at(parts[:-1])
        if parts[-1] not in known:
            section = ".".join(parts[:-1]) or "the run config"
            raise ConfigError(f"search space key {key!r} is not a run-config key; {section} has: {', '.join(known) or 'no keys'}")


def load_sweep(path: str, overrides: Sequence[str] = ()) -> Tuple[SweepConfig, RunConfig]:
    """(SweepConfig, base RunConfig): the sweep file with `key=value` overrides (`config.a.b=v` go to the
    base config), validated, its space checked against the run config. Raises ConfigError."""
    raw = read_yaml_mapping(path, "sweep file")
    base_overrides = [o.removeprefix("config.") for o in overrides if o.startswith("config.")]
    raw = apply_overrides(raw, [o for o in overrides if not o.startswith("config.")])
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in error.errors())
        raise ConfigError(f"sweep error in {path}: {problems}") from None
    base_path = Path(path).parent / sweep.base
    base = load_config(str(base_path), sweep.config + base_overrides)
    check_space_keys(sweep.space)
    for key, distribution in sweep.space.items():
        for value in space_points(distribution):
            try:
                point = trial_config(base, {key: value}, base.run_dir)
                if sweep.trainable == "rlhf":  # the RM phase alone runs every method; the loop not bilevel
                    check_reward_method(point)
            except ConfigError as error:
                raise ConfigError(f"search space {key}={value!r} makes an invalid run config: {error}") from None
    if sweep.trainable == "rlhf":
        check_reward_method(base)
    check_metric(sweep, base)
    return sweep, base


def reported_metrics(trainable: str, base: RunConfig) -> List[str]:
    """What the trainable reports each epoch (reward_model) or round (rlhf), for the metric check."""
    synthetic = base.data.preference.format == "synthetic"
    has_target = base.data.target_eval is not None or synthetic
    evaluation = ["eval_accuracy", "eval_loss"] + (["target_accuracy", "target_loss"] if has_target else [])
    if trainable == "reward_model":
        metarm = base.reward.method == "metarm"
        has_meta = metarm and (base.data.meta is not None or synthetic)
        difference = ["reward_difference_variance", "reward_difference_mean_abs"] if has_meta else []
        bilevel = ["train_outer_loss_after", "train_weight_norm"] if base.reward.method == "bilevel" else []
        return evaluation + difference + bilevel + ["train_loss", "train_accuracy"]
    gold = ["gold_pair_accuracy", "gold_reward"] if synthetic else []
    # judged every round only at every_rounds=1: a metric must be in every report for ASHA to compare trials
    judged = ["win_rate", "tie_rate", "lose_rate", "judge_score"] if base.evaluation.every_rounds == 1 else []
    return evaluation + gold + judged + ["reward_mean", "reward_difference_variance", "kl_per_sequence", "entropy", "response_length"]


def check_metric(sweep: SweepConfig, base: RunConfig) -> None:
    known = reported_metrics(sweep.trainable, base)
    if sweep.metric not in known:
        raise ConfigError(f"metric {sweep.metric!r} is never reported by the {sweep.trainable} trainable with this "
                          f"config; it reports: {', '.join(known)}")


def storage_folder(sweep: SweepConfig) -> Path:
    return Path(sweep.storage_path).expanduser().resolve() / sweep.name
