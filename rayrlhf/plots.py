"""The per-round numbers people compare, drawn: run_dir/rounds.png (matplotlib, no display needed)."""
from pathlib import Path
from typing import Dict, List

PANELS = [
    ("reward", ["reward_mean", "gold_reward"]),
    ("reward-difference variance", ["before_rm_reward_difference_variance", "reward_difference_variance"]),
    ("accuracy; win rate vs the initial policy", ["eval_accuracy", "target_accuracy", "gold_pair_accuracy", "win_rate"]),
    ("KL to reference (per sequence)", ["kl_per_sequence"]),
    ("response length (tokens)", ["response_length"]),
    ("entropy", ["entropy"]),
]


def plot_rounds(history: List[Dict[str, float]], path: Path) -> None:
    """One panel per quantity, one line per metric the run reported, round on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    rounds = [summary["round"] for summary in history]
    for axis, (title, names) in zip(axes.flat, PANELS):
        for name in names:
            if all(name in summary for summary in history):
                axis.plot(rounds, [summary[name] for summary in history], marker="o", label=name)
        axis.set_title(title)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=100)
    plt.close(figure)
