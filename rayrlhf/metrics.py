"""Metrics to a run directory: one JSON object per line (metrics.jsonl) and TensorBoard events.

A line is written whole or not at all: a write that fails (a full disk) is cut back to the line before and
raised as a RunDirWriteError naming the file, so metrics.jsonl never ends in half a record.
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional

from rayrlhf.errors import RunDirWriteError

logger = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "ab", buffering=0)  # unbuffered: a failed write is undone here
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def rewind(self, last_round: int, last_step: int) -> None:
        """Forget what was logged after a checkpoint (round `last_round`, PPO step `last_step`), so a resumed
        run logs its redone steps once: metrics.jsonl is rewritten without them, TensorBoard purges them."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = Path(self._jsonl.name)
        self._jsonl.close()
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _before_checkpoint(line, last_round, last_step)]
        staging = path.with_name(path.name + ".tmp")
        staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(staging, path)
        self._jsonl = open(path, "ab", buffering=0)
        self._tensorboard.close()
        self._tensorboard = SummaryWriter(self._tensorboard.log_dir, purge_step=last_step + 1)

    def log(self, phase: str, step: int, values: Dict[str, Optional[float]]) -> None:
        if not self.enabled:
            return
        record = {"phase": phase, "step": step, **values}
        self._append_line((json.dumps(record) + "\n").encode("utf-8"))
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{phase}/{name}", value, step)

    def _append_line(self, line: bytes) -> None:
        size = os.fstat(self._jsonl.fileno()).st_size
        try:
            written = 0
            while written < len(line):
                written += self._jsonl.write(line[written:])
        except OSError as error:
            try:
                os.ftruncate(self._jsonl.fileno(), size)
            except OSError:
                pass  # the line stays cut; a resumed run's rewind drops it
            raise RunDirWriteError(f"cannot write {self._jsonl.name}: {error.strerror or error}") from None

    def close(self) -> None:
        """Close both files; an error here (the disk still full) is logged, not raised over the one that stopped the run."""
        if not self.enabled:
            return
        for name, closing in (("metrics.jsonl", self._jsonl.close), ("TensorBoard events", self._tensorboard.close)):
            try:
                closing()
            except OSError as error:
                logger.warning("could not close %s: %s", name, error)


def _before_checkpoint(line: str, last_round: int, last_step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False  # a line cut short by a kill
    past_step = record["phase"] == "ppo" and record["step"] > last_step
    past_round = record["phase"] in ("round", "checkpoint") and record["step"] > last_round
    return not (past_step or past_round)
