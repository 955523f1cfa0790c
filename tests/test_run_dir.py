"""One writer per run dir, and a run dir that cannot be written: refused with one paragraph and exit 2 before Ray
starts (rayrlhf/run_dir.py, called by launch)."""
import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayrlhf.actors.rollout_worker import MODEL_FOLDER_PREFIX, sweep_stale_model_folders
from rayrlhf.config import load_config
from rayrlhf.errors import ConfigError, RunDirWriteError
from rayrlhf.metrics import MetricsLogger
from rayrlhf.run_dir import LOCK_NAME, RunDirLock, check_run_dir_writable

from conftest import ROOT, child_env

def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", "rollout.engine=hf", *arguments],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)


def test_a_second_lock_on_the_same_run_dir_is_refused_with_the_holder_named(tmp_path):
    with RunDirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        with pytest.raises(ConfigError, match=rf"is in use by another run \(host {holder['host']}, pid {holder['pid']}, started"):
            RunDirLock(tmp_path).__enter__()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly
    with RunDirLock(tmp_path):
        pass


def test_two_runs_into_one_folder_the_second_is_refused_and_the_first_ends_alone(tmp_path):
    """The issue's case: a second run started into the folder a first one is writing. The second exits 2 naming the
    first, before writing anything; the first finishes with its own metrics only."""
    run_dir = tmp_path / "run"
    small = ("rounds=1", "ppo.steps_per_round=2", "sft.steps=5", "reward.initial_max_steps=5", f"run_dir={run_dir}")
    first = subprocess.Popen([sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", "rollout.engine=hf", *small, "seed=0"],
                             cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / LOCK_NAME).is_file() or not (run_dir / LOCK_NAME).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        second = run_cli(*small, "seed=1")
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "is in use by another run (host" in second.stderr and f"pid {first.pid}," in second.stderr
    assert load_config(str(run_dir / "config.yaml")).seed == 0
    phases = [json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("start") == 1 and phases.count("round") == 1  # one run's records, not two runs' mixed
    assert (run_dir / LOCK_NAME).read_text() == ""  # released when the first run ended


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    stale = {"host": "node-7", "pid": 4242, "started": time.time() - 60}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))  # the record, without the OS lock: its holder is gone
    with caplog.at_level(logging.WARNING), RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != 4242
    assert "(host node-7, pid 4242, started" in caplog.text and "ended without releasing it" in caplog.text


@pytest.mark.parametrize("layout", ["run_dir is a file", "a parent is a file"])
def test_a_file_in_the_way_of_run_dir_is_named(tmp_path, layout):
    (tmp_path / "taken").write_text("not a folder")
    run_dir = tmp_path / "taken" if layout == "run_dir is a file" else tmp_path / "taken" / "run"
    with pytest.raises(ConfigError, match=f"{tmp_path / 'taken'}' is a file, not a folder"):
        check_run_dir_writable(run_dir)


def test_a_read_only_run_dir_is_named_and_nothing_is_created(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    # as on a read-only mount, which a test cannot make without privileges the CI machine may not give
    with pytest.raises(ConfigError, match=rf"run_dir '{tmp_path / 'ro' / 'run'}' cannot be written \('{tmp_path}' is read-only"):
        check_run_dir_writable(tmp_path / "ro" / "run")
    assert not (tmp_path / "ro").exists()


def test_the_command_line_names_a_file_in_the_way_with_exit_2(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    result = run_cli(f"run_dir={tmp_path / 'taken'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is a file, not a folder; choose another run_dir" in result.stderr


class FillsUp:
    """metrics.jsonl's file, as on a disk that fills: the next write puts `room` bytes down, then raises ENOSPC."""

    def __init__(self, raw, room: int):
        self.raw, self.room, self.name = raw, room, raw.name

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.raw.write(data[: self.room])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.raw.write(data)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()
        raise OSError(errno.ENOSPC, "No space left on device")  # as closing on a full disk can


def test_a_metrics_line_the_disk_cannot_hold_is_undone_and_the_file_named(tmp_path):
    metrics = MetricsLogger(tmp_path)
    metrics.log("round", 1, {"gold_reward": 1.5})
    whole = (tmp_path / "metrics.jsonl").read_bytes()
    metrics._jsonl = FillsUp(metrics._jsonl, room=10)  # an injected ENOSPC: a test cannot fill a real disk safely
    with pytest.raises(RunDirWriteError, match=rf"^cannot write {tmp_path / 'metrics.jsonl'}: No space left on device$"):
        metrics.log("round", 2, {"gold_reward": 1.7})
    assert (tmp_path / "metrics.jsonl").read_bytes() == whole  # no half line
    metrics.close()  # the second ENOSPC, on close, is logged rather than raised over the first


def test_a_full_disk_under_the_driver_stops_the_run_naming_the_file_with_exit_2(tmp_path):
    """metrics.jsonl is /dev/full (every write: ENOSPC): the driver's first metrics line fails."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    result = run_cli(f"run_dir={run_dir}", "sft.steps=0", "reward.initial_max_steps=1", "rounds=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: cannot write {run_dir / 'metrics.jsonl'}: No space left on device" in result.stderr
    assert "stopped; last checkpoint: none yet" in result.stderr


def test_model_folders_of_dead_rollout_workers_are_swept_and_live_ones_kept(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{MODEL_FOLDER_PREFIX}{finished.stdout.strip()}-abc"
    live = tmp_path / f"{MODEL_FOLDER_PREFIX}{os.getpid()}-def"
    for folder in (dead, live):
        (folder / "policy").mkdir(parents=True)
    other = tmp_path / "rayrlhf-rollout-notapid"
    other.mkdir()
    assert sweep_stale_model_folders(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()
