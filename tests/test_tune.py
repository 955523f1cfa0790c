"""Ray Tune sweeps (python -m rayrlhf.tune): bad sweep files fail before Ray starts; a real sweep on the TL;DR
comparisons runs its trials, lets ASHA stop the poor ones, writes the table, the plot and a best config that
`python -m rayrlhf.run` runs; an interrupted sweep resumes without redoing finished trials; bilevel reward learning
sweeps as the RM phase, two 2-rank trials at once."""
import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, child_env, shared_file
from rayrlhf.errors import ConfigError
from rayrlhf.tuning.sweep_config import load_sweep

SWEEP = ROOT / "conf" / "sweep_metarm.yaml"
# Each epoch of an RM trial evaluates on the CNN/DM target pairs and meta groups: 40 of each, not the sweep file's 200,
# where a test checks the sweep's machinery rather than what it finds
BILEVEL_SWEEP = ROOT / "conf" / "sweep_bilevel.yaml"
SMALL_EVALUATION = ("config.data.target_eval.max_records=40", "config.data.meta.max_records=40")


def sweep_file(tmp_path, source: Path = SWEEP, **changes) -> Path:
    """A copy of a shipped sweep file with top-level keys replaced (its base named by absolute path)."""
    raw = yaml.safe_load(source.read_text())
    raw["base"] = str(ROOT / "conf" / raw["base"])
    raw.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def tune_command(path: Path, *overrides: str):
    return [sys.executable, "-m", "rayrlhf.tune", str(path), *overrides]


def run_tune(path: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(tune_command(path, *overrides), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("changes, message", [
    ({"space": {"reward.etta": {"loguniform": [1e-4, 1e-1]}}}, "'reward.etta' is not a run-config key; reward has: "),
    ({"space": {}}, "the search space is empty"),
    ({"space": {"reward.eta": {"normal": [0, 1]}}}, "space.reward.eta must be one of {loguniform, uniform, randint, choice, grid"),
    ({"space": {"reward.inner_steps": {"grid": [0, 1]}}}, "reward.inner_steps=0 makes an invalid run config"),
    ({"metric": "gold_reward"}, "metric 'gold_reward' is never reported by the reward_model trainable"),
    ({"search": {"algorithm": "optuna"}}, "optuna cannot search grid keys"),
])
def test_a_bad_sweep_is_refused_naming_the_culprit(tmp_path, changes, message):
    shared_file("tokenizers", "gpt2")  # conf/sweep_metarm.yaml's tokenizer; its data ships in data/
    with pytest.raises(ConfigError) as error:
        load_sweep(str(sweep_file(tmp_path, **changes)))
    assert message in str(error.value)


def test_bilevel_reward_learning_sweeps_as_the_rm_phase_and_is_refused_by_the_loop(tmp_path):
    _, base = load_sweep(str(sweep_file(tmp_path, BILEVEL_SWEEP)), ["config.reward.max_steps=2"])
    assert base.reward.method == "bilevel"
    loop = sweep_file(tmp_path, ROOT / "conf" / "sweep_loop.yaml")
    with pytest.raises(ConfigError, match=r"reward.method='bilevel' .* not in the round loop"):
        load_sweep(str(loop), ["config.reward.method=bilevel", "config.reward.bilevel.domain_by=topic"])
    with pytest.raises(ConfigError, match=r"search space reward.method='bilevel' makes an invalid run config: .* not in the round loop"):
        load_sweep(str(sweep_file(tmp_path, ROOT / "conf" / "sweep_loop.yaml", space={"reward.method": {"choice": ["metarm", "bilevel"]}})),
                   ["config.reward.bilevel.domain_by=topic"])


def test_a_bad_sweep_exits_2_before_ray_starts(tmp_path):
    shared_file("tokenizers", "gpt2")  # conf/sweep_metarm.yaml's tokenizer; its data ships in data/
    storage = tmp_path / "sweeps"
    result = run_tune(sweep_file(tmp_path), f"storage_path={storage}", "metric=reward_mean", expect=2)
    assert result.stderr.startswith("error: metric 'reward_mean' is never reported") and "Traceback" not in result.stderr
    assert not storage.exists()  # nothing started, nothing written


def read_trials(folder: Path):
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_tldr_sweep_stops_poor_trials_early_and_writes_a_best_config_that_runs(tmp_path):
    shared_file("tokenizers", "gpt2")  # conf/sweep_metarm.yaml's tokenizer; its data ships in data/
    # Built so ASHA must stop trials: alpha 1e-9 barely moves the RM, so its training loss stays near log 2,
    # while alpha 1e-3 lowers it. With one trial at a time the first (alpha 1e-3, listed first) sets the bar
    # at the first rung; each 1e-9 trial arrives below it and is stopped after epoch 1.
    space = {"reward.eta": {"loguniform": [1e-4, 1e-1]}, "reward.inner_steps": {"grid": [1, 2]},
             "reward.alpha": {"grid": [1e-3, 1e-9]}}
    path = sweep_file(tmp_path, space=space, metric="train_loss", mode="min", num_samples=1, max_concurrent=1)
    storage = tmp_path / "sweeps"
    result = run_tune(path, f"storage_path={storage}", "config.reward.epochs=2", "config.reward.max_steps=4",  # 4 steps an epoch
                      *SMALL_EVALUATION)
    folder = storage / "metarm_tldr"
    trials = read_trials(folder)
    assert len(trials) == 4 and sorted(int(t["reward.inner_steps"]) for t in trials) == [1, 1, 2, 2]
    assert all(1e-4 <= float(t["reward.eta"]) <= 1e-1 for t in trials)
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert stopped and all(float(t["reward.alpha"]) == 1e-9 and t["epoch"] == "1" for t in stopped)
    assert all(t["status"] == "finished" and t["epoch"] == "2" for t in trials if float(t["reward.alpha"]) == 1e-3)
    # Each trial reported the TL;DR held-out and CNN/DM target accuracies and the meta data's reward differences.
    for trial_dir in (p for p in folder.iterdir() if p.is_dir()):
        last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
        assert 0 <= last["eval_accuracy"] <= 1 and last["target_pairs"] == 40 and last["reward_difference_variance"] >= 0
    best = min(trials, key=lambda t: float(t["train_loss"]))
    assert f"best trial {best['trial']}" in result.stdout and (folder / "trials.png").stat().st_size > 0
    best_config = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best_config["reward"]["eta"] == pytest.approx(float(best["reward.eta"]))
    assert best_config["reward"]["inner_steps"] == int(best["reward.inner_steps"])

    run_dir = tmp_path / "best_run"
    run = subprocess.run(
        [sys.executable, "-m", "rayrlhf.run", str(folder / "best_config.yaml"), f"run_dir={run_dir}", "rounds=1",
         "rollout.engine=hf", "reward.initial_max_steps=2", "reward.max_steps=2", "reward.meta_prompts_per_round=4",
         "ppo.steps_per_round=1", "ppo.rollout_batch_size=4", "rollout.max_new_tokens=8"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["reward"]["eta"] == best_config["reward"]["eta"]
    assert (run_dir / "reward_model").is_dir()


def finished_trials(folder: Path, epochs: int):
    """Trial folders whose result.json holds all `epochs` reports."""
    done = []
    for result in folder.glob("*/result.json"):
        if len(result.read_text().splitlines()) >= epochs:
            done.append(result)
    return done


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(tmp_path):
    shared_file("tokenizers", "gpt2")  # conf/sweep_metarm.yaml's tokenizer; its data ships in data/
    path = sweep_file(tmp_path, space={"reward.eta": {"grid": [1e-3, 1e-2, 1e-1]}},
                      search={"algorithm": "grid"}, scheduler={"name": "fifo"}, max_concurrent=1)
    storage = tmp_path / "sweeps"
    folder = storage / "metarm_tldr"
    quick = ("config.reward.epochs=2", "config.reward.max_steps=8", *SMALL_EVALUATION)  # 8 of an epoch's 21 steps: the machinery only
    process = subprocess.Popen(tune_command(path, f"storage_path={storage}", *quick), cwd=ROOT,
                               env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not finished_trials(folder, 2) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # as Ctrl-C: Tune saves the sweep's state and stops
    _, stderr = process.communicate(timeout=300)
    finished = {p: p.read_text() for p in finished_trials(folder, 2)}
    assert finished and len(finished) < 3, stderr[-3000:]

    result = run_tune(path, f"storage_path={storage}", *quick, "resume=true")
    trials = read_trials(folder)
    assert len(trials) == 3 and all(t["status"] == "finished" for t in trials), result.stdout[-3000:]
    for result_file, content in finished.items():
        assert result_file.read_text() == content  # kept, not trained again
    again = run_tune(path, f"storage_path={storage}", expect=2)
    # refused from the files, before Ray starts (which would print first)
    assert again.stderr.startswith(f"error: {folder} already holds a sweep; continue it with resume=true"), again.stderr[-2000:]
    fresh = run_tune(path, f"storage_path={tmp_path / 'none'}", "resume=true", expect=2)
    assert fresh.stderr.startswith(f"error: resume=true but {tmp_path / 'none' / 'metarm_tldr'} holds no sweep"), fresh.stderr[-2000:]


@pytest.mark.slow
def test_concurrent_bilevel_trials_each_run_their_own_group_of_ranks_and_report_every_epoch(tmp_path):
    """conf/sweep_bilevel.yaml's 2 trials at once, each bilevel meta-training on 2 gloo ranks (their reductions need
    a process group per trial), each reporting both epochs; the best config names the method and its inner step."""
    storage = tmp_path / "sweeps"
    run_tune(sweep_file(tmp_path, BILEVEL_SWEEP, max_concurrent=2), f"storage_path={storage}", "config.reward.max_steps=3",
             "config.resources.reward_learner_ranks=2", "config.resources.cpus_per_actor=0.4")
    folder = storage / "bilevel_topics"
    assert [t["status"] for t in read_trials(folder)] == ["finished", "finished"]
    # The two trials' 2-rank gloo groups trained at the same time, so each had its own group and port.
    spans = []
    for result_file in folder.glob("*/result.json"):
        reports = [json.loads(line) for line in result_file.read_text().splitlines()]
        assert [r["epoch"] for r in reports] == [1, 2]
        assert all(r["train_steps"] == 3 and r["train_weight_norm"] > 0 and 0 <= r["eval_accuracy"] <= 1 for r in reports)
        spans.append((reports[-1]["timestamp"] - reports[-1]["time_total_s"], reports[-1]["timestamp"]))
    assert len(spans) == 2 and max(start for start, _ in spans) < min(end for _, end in spans)
    best = yaml.safe_load((folder / "best_config.yaml").read_text())
    assert best["reward"]["method"] == "bilevel" and best["reward"]["bilevel"]["inner_lr"] in (0.1, 1.0)
