"""Metrics to a run directory: one JSON object per line (metrics.jsonl) and TensorBoard events."""
import json
import math
from pathlib import Path
from typing import Dict, Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, phase: str, step: int, values: Dict[str, Optional[float]]) -> None:
        if not self.enabled:
            return
        record = {"phase": phase, "step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{phase}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
