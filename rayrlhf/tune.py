"""Sweep MetaRM's meta-learning rates and inner-step counts with Ray Tune.

    python -m rayrlhf.tune conf/sweep_metarm.yaml [key=value ...] [config.a.b=value ...]
    python -m rayrlhf.tune conf/sweep_metarm.yaml resume=true      # continue an interrupted sweep
    ray job submit -- python -m rayrlhf.tune conf/sweep_metarm.yaml

The sweep file (rayrlhf/tuning/sweep_config.py) names a base run config, a search space over its keys, the
search algorithm, the scheduler (ASHA by default), the metric and the trials' resources. Everything is
checked before Ray starts. Each trial reports after every epoch (reward_model) or round (rlhf), so ASHA
stops poor trials early, and checkpoints, so an interrupted sweep resumes. At the end, under
storage_path/name: trials.csv (the table printed), trials.png (metric against each swept key) and
best_config.yaml (the best trial's full run config, for `python -m rayrlhf.run`).
"""
import os
import sys
from typing import List, Optional

from rayrlhf.cli import run_command_with
from rayrlhf.config import RunConfig
from rayrlhf.errors import ConfigError
from rayrlhf.tuning.sweep_config import SweepConfig, load_sweep, storage_folder


def search_algorithm(sweep: SweepConfig):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as error:
            raise ConfigError(f"search.algorithm=optuna needs optuna installed (pip install optuna): {error}") from None
        return OptunaSearch(seed=sweep.search.seed)
    return BasicVariantGenerator(random_state=sweep.search.seed)


def tune_space(space: dict) -> dict:
    """The sweep file's distributions as Tune's (flat dotted keys)."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(a[0], a[1] + 1), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](arguments) for key, distribution in space.items() for kind, arguments in distribution.items()}


def check_fits(sweep: SweepConfig, base: RunConfig, cluster: dict) -> None:
    """ConfigError when one trial's bundles exceed the whole cluster (it would wait forever)."""
    from rayrlhf.tuning.trainables import trial_resources

    needed: dict = {}
    for each in trial_resources(sweep.trainable, base, sweep.driver_cpus).bundles:
        for name, amount in each.items():
            needed[name] = needed.get(name, 0) + amount
    for name, amount in needed.items():
        if amount > cluster.get(name, 0) + 1e-9:
            raise ConfigError(f"one trial needs {amount:g} {name} (driver_cpus {sweep.driver_cpus:g} plus its actors' "
                              f"resources.*) but the Ray cluster has {cluster.get(name, 0):g}")


def check_storage(sweep: SweepConfig) -> None:
    """resume=true needs a stored sweep, a new sweep an unused folder: checked from the files, before Ray starts."""
    from ray import tune

    folder = storage_folder(sweep)
    if sweep.resume and not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"resume=true but {folder} holds no sweep to continue")
    if not sweep.resume and tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"{folder} already holds a sweep; continue it with resume=true or choose another name")


def build_tuner(sweep: SweepConfig, base: RunConfig):
    """A new Tuner, or (resume=true) the stored sweep restored: finished trials kept, the rest go on."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayrlhf.tuning.trainables import TIME_ATTRIBUTE, budget, with_bundles

    folder = storage_folder(sweep)
    trainable = with_bundles(sweep.trainable, base, sweep.driver_cpus, os.getcwd())
    if sweep.resume:  # check_storage has seen a stored sweep there
        return tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTRIBUTE[sweep.trainable], max_t=budget(sweep.trainable, base),
                               grace_period=sweep.scheduler.grace_period, reduction_factor=sweep.scheduler.reduction_factor)
                 if sweep.scheduler.name == "asha" else FIFOScheduler())
    grid_only = sweep.search.algorithm == "grid"
    return tune.Tuner(
        trainable,
        param_space=tune_space(sweep.space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, search_alg=search_algorithm(sweep),
                                    scheduler=scheduler, num_samples=1 if grid_only else sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(folder.parent),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1),
    )


def sweep_and_report(sweep: SweepConfig, base: RunConfig) -> None:
    # Every report checkpoints (so trials resume); Tune warns when that makes it snapshot its state often.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from rayrlhf.actors.placement import connect_ray, disconnect_ray

    check_storage(sweep)
    ray = connect_ray()
    try:
        check_fits(sweep, base, ray.cluster_resources())
        report_sweep(build_tuner(sweep, base).fit(), sweep, base)
    finally:
        disconnect_ray()


def report_sweep(results, sweep: SweepConfig, base: RunConfig) -> None:
    """The trials' table, trials.csv, trials.png and the best trial's config, written into the sweep's folder."""
    from rayrlhf.tuning.report import best_row, format_rows, plot_trials, trial_rows, write_best_config, write_csv
    from rayrlhf.tuning.trainables import TIME_ATTRIBUTE, budget

    folder = storage_folder(sweep)
    keys = list(sweep.space)
    rows = trial_rows(results, keys, sweep.metric, sweep.mode, TIME_ATTRIBUTE[sweep.trainable], budget(sweep.trainable, base))
    print(format_rows(rows))
    write_csv(rows, folder / "trials.csv")
    plot_trials(rows, sweep.space, sweep.metric, folder / "trials.png")
    best = best_row(rows, sweep.metric)
    if best is None:
        raise ConfigError(f"no trial reported {sweep.metric}; see the trials' errors under {folder}")
    write_best_config(base, best, keys, f"runs/{sweep.name}_best", folder / "best_config.yaml")
    print(f"best trial {best['trial']}: {sweep.metric}={best[sweep.metric]:.4g}; "
          f"its config: {folder / 'best_config.yaml'} (python -m rayrlhf.run {folder / 'best_config.yaml'})")

def main(argv: Optional[List[str]] = None) -> int:
    return run_command_with(__doc__, argv, load_sweep, lambda loaded: sweep_and_report(*loaded))


if __name__ == "__main__":
    sys.exit(main())
