"""The evaluation's figures (matplotlib, no display needed)."""
from pathlib import Path
from typing import Dict, Tuple

import torch


def plot_reward_difference_densities(differences: Dict[int, Tuple[torch.Tensor, str]], path: Path) -> None:
    """One density curve of r(x, s_i) - r(x, s_j) per round (Gaussian kernel estimate, scipy), its variance in the
    legend, as the paper draws it: a curve narrowing over the rounds is an RM that stops telling the policy's
    responses apart. A round whose differences are all equal is a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    values = torch.cat([d for d, _ in differences.values()]).double()
    low, high = values.min().item(), values.max().item()
    margin = 0.1 * (high - low) + 1e-3
    grid = torch.linspace(low - margin, high + margin, 400)
    colours = plt.cm.viridis(torch.linspace(0, 1, max(len(differences), 2)).tolist())
    for colour, (round_index, (round_differences, scored_by)) in zip(colours, sorted(differences.items())):
        variance = round_differences.double().var(unbiased=False).item()
        label = f"round {round_index} (var {variance:.3g})"
        if variance < 1e-12 or round_differences.numel() < 2:
            axis.axvline(round_differences[0].item(), color=colour, label=label)
            continue
        density = gaussian_kde(round_differences.double().numpy())(grid.numpy())
        axis.plot(grid.numpy(), density, color=colour, label=label)
    scorers = sorted({scored_by for _, scored_by in differences.values()})
    axis.set_title(f"reward difference between same-prompt policy samples (scored by {', '.join(scorers)})", fontsize=9)
    axis.set_xlabel("r(x, s_i) - r(x, s_j)")
    axis.set_ylabel("density")
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_win_rates(policies: Dict[str, Dict[str, float]], path: Path) -> None:
    """Stacked win / tie / lose bars of each judged policy against the initial one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = {name: values for name, values in policies.items() if "win_rate" in values}
    figure, axis = plt.subplots(figsize=(6, 0.6 * len(judged) + 1.5), constrained_layout=True)
    names = list(judged)
    left = [0.0] * len(names)
    for key, colour in (("win_rate", "tab:green"), ("tie_rate", "tab:gray"), ("lose_rate", "tab:red")):
        widths = [judged[name][key] for name in names]
        axis.barh(names, widths, left=left, color=colour, label=key.removesuffix("_rate"))
        left = [a + b for a, b in zip(left, widths)]
    axis.set_xlim(0, 1)
    axis.set_xlabel("share of held-out prompts, against the initial policy")
    axis.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=100)
    plt.close(figure)
