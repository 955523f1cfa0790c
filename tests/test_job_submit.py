"""The main job through `ray job submit` against a real Ray head that this module starts (loopback dashboard,
Ray's default token auth) and stops (only its own processes, through the Cluster object that started them):
the run's outputs land in the configured run_dir, a failing job's exit status and error reach the submitter,
a job stopped mid-run leaves a run dir that a second job resumes to the end, and a submitted sweep reports every
round of its trials.
"""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.cluster_utils import Cluster

from conftest import ROOT, child_env
from rayrlhf.checkpoints import checkpoint_path, latest_checkpoint, read_state
from rayrlhf.training.distributed import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
# The repository travels as the job's working_dir; the venv stays behind (the entrypoint names its python).
RUNTIME_ENV = json.dumps({"working_dir": str(ROOT), "excludes": [".venv", ".git", ".gpu", "runs", "*.pyc"]})
QUICK = ["rollout.engine=hf", "sft.steps=10", "reward.initial_max_steps=10", "ppo.steps_per_round=4"]


@pytest.fixture(scope="module")
def job_env():
    """A Ray head with its dashboard on loopback; the environment a `ray job` client needs to reach it."""
    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port})
    try:
        env = {**child_env(), "RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}", "RAY_AUTH_MODE": "token"}
        wait_for_the_job_agent(env)
        yield env
    finally:
        cluster.shutdown()


def wait_for_the_job_agent(env: dict, timeout_s: float = 180) -> None:
    """Submit trivial jobs until one is accepted: on a busy machine the head's dashboard agent registers some
    seconds after the head is up, and a job submitted before then is refused ("No available agent to submit
    job", seen in CI), which is not what these tests are about."""
    deadline = time.time() + timeout_s
    while True:
        result = ray_job(env, "submit", "--", sys.executable, "-c", "pass", timeout=120)
        if result.returncode == 0 or time.time() > deadline:
            assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
            return
        time.sleep(2)


def ray_job(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def submit(env: dict, *run_args: str, wait: bool = True) -> subprocess.CompletedProcess:
    return ray_job(env, "submit", *([] if wait else ["--no-wait"]), "--runtime-env-json", RUNTIME_ENV, "--",
                   sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", *run_args)


def submission_id(result: subprocess.CompletedProcess) -> str:
    return next(word.strip("'") for word in (result.stdout + result.stderr).split() if word.strip("'").startswith("raysubmit_"))


def rounds_written(run_dir: Path) -> list:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["round"] for record in map(json.loads, lines) if record["phase"] == "round"]


def test_a_submitted_run_follows_its_logs_and_writes_the_run_dir(job_env, tmp_path):
    run_dir = tmp_path / "run"
    result = submit(job_env, f"run_dir={run_dir}", "rounds=2", *QUICK)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "succeeded" in output and "round      reward" in output  # the job's own table, followed live
    assert rounds_written(run_dir) == [1, 2]
    assert (run_dir / "policy" / "config.json").exists() and (run_dir / "rounds.csv").exists()


def test_a_failing_job_reports_its_error_and_a_nonzero_status(job_env, tmp_path):
    result = submit(job_env, f"run_dir={tmp_path / 'run'}", "reward.etaa=0.1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "reward.etaa" in output and "failed" in output
    assert not (tmp_path / "run").exists()


def test_a_stopped_job_leaves_a_run_dir_that_a_second_job_resumes(job_env, tmp_path):
    run_dir = tmp_path / "run"
    started = submit(job_env, f"run_dir={run_dir}", "rounds=40", *QUICK, wait=False)  # far longer than the wait below
    assert started.returncode == 0, started.stderr[-2000:]
    job = submission_id(started)
    deadline = time.time() + 300
    while not checkpoint_path(run_dir, 1).exists():  # stop it once round 1 is safely on disk
        assert time.time() < deadline, ray_job(job_env, "logs", job).stdout[-3000:]
        time.sleep(0.5)
    stopped = ray_job(job_env, "stop", job)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    status = ray_job(job_env, "status", job)
    assert "was stopped" in status.stdout + status.stderr
    assert not (run_dir / "policy").exists()  # the final models are written only by a finished run
    done = read_state(latest_checkpoint(run_dir))["round"]
    assert 1 <= done < 40

    resumed = submit(job_env, f"run_dir={run_dir}", f"rounds={done + 1}", *QUICK, "resume=true")  # one round more
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert set(rounds_written(run_dir)) == set(range(1, done + 2))
    assert [row.split(",")[0] for row in (run_dir / "rounds.csv").read_text().splitlines()[1:]] == [str(r) for r in range(1, done + 2)]
    assert (run_dir / "policy" / "config.json").exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(run_dir / "checkpoints"))  # only complete checkpoints


def test_a_submitted_loop_sweep_with_optuna_reports_every_round_of_whole_runs(job_env, tmp_path):
    """conf/sweep_loop.yaml (Optuna's TPE over whole runs of the embedded default, judged by win rate every round)
    as a job on the cluster: each trial reports each round as its run writes it, and keeps its final models."""
    sweep = yaml.safe_load((ROOT / "conf" / "sweep_loop.yaml").read_text())
    sweep.update(base=str(ROOT / "conf" / "tiny.yaml"), num_samples=2, scheduler={"name": "fifo"},
                 storage_path=str(tmp_path / "sweeps"), config=sweep["config"] + ["rounds=2"] + QUICK)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = ray_job(job_env, "submit", "--runtime-env-json", RUNTIME_ENV, "--",
                     sys.executable, "-m", "rayrlhf.tune", str(path), timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-3000:]
    folder = tmp_path / "sweeps" / "metarm_loop"
    assert "best trial" in output and (folder / "best_config.yaml").exists()
    assert list(folder.glob("searcher-state-*.pkl"))  # Optuna's TPE chose the points
    with open(folder / "trials.csv") as handle:
        trials = list(csv.DictReader(handle))
    assert len(trials) == 2 and all(t["status"] == "finished" and t["round"] == "2" for t in trials)
    for trial_dir in (p for p in folder.iterdir() if p.is_dir()):
        reported = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        with open(trial_dir / "run" / "rounds.csv") as handle:
            written = list(csv.DictReader(handle))
        # Tune saw each round as the run wrote it, and the finished run kept its final models.
        assert [r["round"] for r in reported] == [1, 2]
        assert [r["gold_reward"] for r in reported] == pytest.approx([float(w["gold_reward"]) for w in written])
        assert [r["win_rate"] for r in reported] == pytest.approx([float(w["win_rate"]) for w in written])  # the metric
        assert (trial_dir / "run" / "policy").is_dir() and (trial_dir / "run" / "reward_model").is_dir()
        params = json.loads((trial_dir / "params.json").read_text())
        config = yaml.safe_load((trial_dir / "run" / "config.yaml").read_text())
        assert config["reward"]["eta"] == params["reward.eta"] and config["reward"]["inner_steps"] == params["reward.inner_steps"]
