"""What a finished sweep leaves: the table of trials (printed and as CSV), the metric drawn against each
swept key, and the best trial's full run config as YAML that `python -m rayrlhf.run` reads unchanged."""
import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from rayrlhf.config import RunConfig, save_config
from rayrlhf.tuning.sweep_config import trial_config


def trial_rows(results, space_keys: List[str], metric: str, mode: str, time_attribute: str, budget: int) -> List[Dict[str, Any]]:
    """One row per trial (params, last and best metric, reports made, status), best last-metric first.
    `results` is Tune's ResultGrid."""
    rows = []
    for result in results:
        reported = result.metrics or {}
        history = result.metrics_dataframe
        values = [] if history is None or metric not in history else [v for v in history[metric] if not math.isnan(v)]
        reports = int(reported.get(time_attribute, 0))
        status = "error" if result.error else ("stopped early" if reports < budget else "finished")
        rows.append({
            "trial": reported.get("trial_id", Path(result.path).name),
            **{key: result.config.get(key) for key in space_keys},
            metric: reported.get(metric, float("nan")),
            f"best_{metric}": (max(values) if mode == "max" else min(values)) if values else float("nan"),
            time_attribute: reports,
            "status": status,
        })
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda row: (math.isnan(row[metric]), sign * row[metric] if not math.isnan(row[metric]) else 0))


def best_row(rows: List[Dict[str, Any]], metric: str) -> Optional[Dict[str, Any]]:
    """The best trial that reported the metric (rows come sorted best first)."""
    return next((row for row in rows if row["status"] != "error" and not math.isnan(row[metric])), None)


def format_rows(rows: List[Dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(row[c])) for row in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(row[c]).rjust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_trials(rows: List[Dict[str, Any]], space: Dict[str, Dict[str, Any]], metric: str, path: Path) -> None:
    """One panel per swept key: each trial's last metric against its value (log axis for loguniform keys),
    finished and early-stopped trials marked apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(space), figsize=(4.5 * len(space), 3.8), constrained_layout=True, squeeze=False)
    for axis, (key, distribution) in zip(axes.flat, space.items()):
        for status, marker in (("finished", "o"), ("stopped early", "x"), ("error", "s")):
            chosen = [row for row in rows if row["status"] == status and isinstance(row[key], (int, float))]
            if chosen:
                axis.scatter([row[key] for row in chosen], [row[metric] for row in chosen], marker=marker, label=status)
        if "loguniform" in distribution:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_best_config(base: RunConfig, row: Dict[str, Any], space_keys: List[str], run_dir: str, path: Path) -> RunConfig:
    config = trial_config(base, {key: row[key] for key in space_keys}, run_dir)
    save_config(config, path)
    return config
