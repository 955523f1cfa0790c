"""The main job: RLHF with a reward model that keeps up with the policy (MetaRM), on Ray.

    python -m rayrlhf.run CONF [key.sub=value ...]
    ray job submit -- python -m rayrlhf.run conf/tldr.yaml

Joins the Ray cluster named by RAY_ADDRESS (as under `ray job submit`) or starts a local one. Everything
that can be checked is checked before any actor starts: the config, the data, the model sources, the
rollout engine, the resources against the cluster. Writes run_dir: config.yaml, metrics.jsonl,
tensorboard/, checkpoints/, reference/, and at the end policy/ and reward_model/ as transformers folders,
rounds.csv, rounds.png and a per-round table. `resume=true` continues from the last checkpoint; Ctrl-C keeps it.
"""
import sys
from typing import Dict, List, Optional

from rayrlhf.cli import run_command
from rayrlhf.config import RunConfig
from rayrlhf.launch import launch

TABLE_COLUMNS = [
    ("round", "round", "{:.0f}"),
    ("reward_mean", "reward", "{:+.3f}"),
    ("reward_difference_variance", "rdiff var", "{:.4f}"),
    ("eval_accuracy", "RM acc", "{:.3f}"),
    ("gold_pair_accuracy", "gold acc", "{:.3f}"),
    ("gold_reward", "gold rew", "{:+.3f}"),
    ("win_rate", "win", "{:.3f}"),
    ("lose_rate", "lose", "{:.3f}"),
    ("kl_per_sequence", "KL", "{:.4f}"),
    ("gil_return_variance", "grp var", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("response_length", "length", "{:.1f}"),
    ("peak_memory_gb", "peak GB", "{:.2f}"),
    ("round_seconds", "seconds", "{:.1f}"),
]


def format_table(history: List[Dict[str, float]]) -> str:
    columns = [c for c in TABLE_COLUMNS if any(c[0] in summary for summary in history)]
    lines = ["  ".join(f"{title:>10}" for _, title, _ in columns)]
    for summary in history:
        lines.append("  ".join(f"{fmt.format(summary[key]) if key in summary else '-':>10}" for key, _, fmt in columns))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    def job(config: RunConfig) -> None:
        from rayrlhf.actors.placement import disconnect_ray  # imports Ray: only once the config has been checked

        try:
            history = launch(config)
        finally:
            disconnect_ray()
        print(format_table(history))
        print(f"run directory: {config.run_dir}")

    try:
        return run_command(__doc__, argv, job)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - an actor's failure: show its traceback, not ours
        if type(error).__module__.startswith("ray."):
            print(f"error: an actor failed:\n{error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
