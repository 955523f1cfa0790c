"""Reward over-optimisation on the embedded default task: vanilla RM against MetaRM, per seed and paired.

    python benchmarks/overoptimisation.py --seeds 0 1 2 3 4 --methods vanilla metarm --out DIR
        [--variant metarm_eta0.1=reward.method=metarm,reward.eta=0.1 ...]
        [--rounds 10] [--set reward.eta=0.05 ...] [--config conf/tiny.yaml] [--reuse]

A method is `vanilla` or `metarm` (reward.method); a variant is LABEL=KEY=VALUE[,KEY=VALUE...], e.g. MetaRM with
another eta, inner_steps or reset_each_round, compared with the first method like the methods are.

Each (method or variant, seed) is one run of `python -m rayrlhf.run CONFIG` (sequentially, transformers engine) in
DIR/runs/METHOD_sSEED; its metrics.jsonl gives per round:

    gold        mean gold reward of the round's PPO rollouts (steps_per_round x rollout batch)
    proxy       mean score of the round's own RM on those rollouts (reward_mean; the RM is retrained each
                round, so its scale moves with more than the policy)
    fixed       mean score of ONE fixed RM, the run's final one (run_dir/reward_model), on the meta samples
                drawn at the round's start (samples/round_NNNN_meta.jsonl): the proxy on a single scale
    gain        within-round proxy gain: mean reward_mean of the round's last two PPO steps minus its first
                two (one RM throughout)
    acc         the RM's accuracy on gold-labelled pairs of the policy's own samples (gold_pair_accuracy)
    var         variance of same-prompt reward differences on those samples (reward_difference_variance)

Verdict (over-optimised), per run: the gold curve peaks at an interior round p (1 < p < R) with
gold[p] - gold[1] >= MARGIN and gold[p] - gold[R] >= MARGIN, while the fixed-RM proxy rises past the peak:
fixed[R] > fixed[p] and fixed[R] > fixed[1].

For each method, mean and standard deviation over seeds per round; for each pair of methods (B - A, in the
order given), per-seed differences of final-round gold, peak gold and mean gold_pair_accuracy: mean, std and
how many seeds favour each. Writes DIR/overoptimisation.md and DIR/overoptimisation.json.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARGIN = 0.3
SERIES = ("gold", "proxy", "fixed", "gain", "acc", "var", "kl", "length")


# ---- running ---------------------------------------------------------------------------------------------
def run_command(config: str, run_dir: Path, overrides: List[str], seed: int, rounds: Optional[int],
                sets: List[str]) -> List[str]:
    command = [sys.executable, "-m", "rayrlhf.run", config, f"run_dir={run_dir}", f"seed={seed}", "rollout.engine=hf"]
    return command + list(overrides) + ([f"rounds={rounds}"] if rounds else []) + list(sets)


def arms(methods: List[str], variants: List[str]) -> Dict[str, List[str]]:
    """label -> the overrides that make it: each method (reward.method=METHOD), then each LABEL=K=V,K=V variant."""
    chosen = {method: [f"reward.method={method}"] for method in methods}
    for spec in variants:
        label, _, overrides = spec.partition("=")
        if not label or "=" not in overrides:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=KEY=VALUE[,KEY=VALUE...]")
        chosen[label] = overrides.split(",")
    return chosen


def run_one(command: List[str], run_dir: Path) -> float:
    """Run one training run, its output into run_dir.log; returns the wall time (s)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(str(run_dir) + ".log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {' '.join(command)}; see {run_dir}.log")
    return time.perf_counter() - started


# ---- reading ---------------------------------------------------------------------------------------------
def read_records(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def within_round_gain(steps: List[dict]) -> float:
    """mean reward_mean of the last two PPO steps - of the first two (one RM scores them all)."""
    head, tail = steps[:2], steps[-2:]
    return statistics.mean(s["reward_mean"] for s in tail) - statistics.mean(s["reward_mean"] for s in head)


def fixed_rm_scores(run_dir: Path, rounds: int) -> List[float]:
    """Mean score of the run's final RM on each round's meta samples (one fixed proxy for every round)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rayrlhf.config import load_config
    from rayrlhf.data.batches import encode_prompt_response, pad_right
    from rayrlhf.models.heads import reward_scores

    data = load_config(run_dir / "config.yaml").data
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "reward_model")
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward_model").float().eval()
    means = []
    for round_index in range(1, rounds + 1):
        rows = [json.loads(line) for line in open(run_dir / "samples" / f"round_{round_index:04d}_meta.jsonl")]
        sequences = [encode_prompt_response(tokenizer, row["prompt"], response, data.max_prompt_tokens,
                                            data.max_response_tokens)
                     for row in rows for response in row["responses"]]
        ids, mask = pad_right(sequences, tokenizer.pad_token_id)
        with torch.no_grad():
            means.append(reward_scores(model, ids, mask).mean().item())
    return means


def run_series(run_dir: Path) -> Dict[str, List[float]]:
    """Per-round series (SERIES) of one finished run."""
    records = read_records(run_dir)
    rounds = [r for r in records if r["phase"] == "round"]
    steps = [r for r in records if r["phase"] == "ppo"]
    return {
        "gold": [r["gold_reward"] for r in rounds],
        "proxy": [r["reward_mean"] for r in rounds],
        "fixed": fixed_rm_scores(run_dir, len(rounds)),
        "gain": [within_round_gain([s for s in steps if s["round"] == r["round"]]) for r in rounds],
        "acc": [r["gold_pair_accuracy"] for r in rounds],
        "var": [r["reward_difference_variance"] for r in rounds],
        "kl": [r["kl_per_sequence"] for r in rounds],
        "length": [r["response_length"] for r in rounds],
    }


def verdict(series: Dict[str, List[float]]) -> Dict[str, object]:
    """The over-optimisation verdict of the module docstring, with the numbers it rests on."""
    gold, fixed = series["gold"], series["fixed"]
    last = len(gold) - 1
    peak = max(range(len(gold)), key=gold.__getitem__)
    rise, fall = gold[peak] - gold[0], gold[peak] - gold[last]
    proxy_rises = fixed[last] > fixed[peak] and fixed[last] > fixed[0]
    shown = 0 < peak < last and rise >= MARGIN and fall >= MARGIN and proxy_rises
    return {"overoptimised": shown, "peak_round": peak + 1, "rise": rise, "fall": fall,
            "fixed_proxy_after_peak": fixed[last] - fixed[peak], "fixed_proxy_overall": fixed[last] - fixed[0]}


# ---- summaries -------------------------------------------------------------------------------------------
def spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def per_round_spread(runs: Dict[int, Dict[str, List[float]]], name: str) -> List[Dict[str, float]]:
    rounds = min(len(s[name]) for s in runs.values())
    return [spread([s[name][r] for s in runs.values()]) for r in range(rounds)]


def paired(a: Dict[int, Dict[str, List[float]]], b: Dict[int, Dict[str, List[float]]]) -> Dict[str, dict]:
    """Per-seed differences b - a of final gold, peak gold and mean gold_pair_accuracy over common seeds."""
    seeds = sorted(set(a) & set(b))
    measures = {"final_gold": lambda s: s["gold"][-1], "peak_gold": lambda s: max(s["gold"]),
                "mean_gold_pair_accuracy": lambda s: statistics.mean(s["acc"])}
    result = {}
    for name, measure in measures.items():
        differences = [measure(b[seed]) - measure(a[seed]) for seed in seeds]
        result[name] = {"per_seed": dict(zip(seeds, differences)), **spread(differences),
                        "seeds_favouring_b": sum(d > 0 for d in differences),
                        "seeds_favouring_a": sum(d < 0 for d in differences)}
    return result


# ---- printing --------------------------------------------------------------------------------------------
def series_table(title: str, series: Dict[str, List[float]]) -> List[str]:
    rounds = len(series["gold"])
    lines = [f"**{title}**", "", "| round | " + " | ".join(str(r + 1) for r in range(rounds)) + " |",
             "|---|" + "---:|" * rounds]
    lines += [f"| {name} | " + " | ".join(f"{v:+.2f}" for v in series[name]) + " |" for name in SERIES]
    return lines + [""]


def spread_table(title: str, runs: Dict[int, Dict[str, List[float]]]) -> List[str]:
    columns = [per_round_spread(runs, name) for name in SERIES]
    rounds = len(columns[0])
    lines = [f"**{title}** (mean ± std over {len(runs)} seeds)", "",
             "| round | " + " | ".join(str(r + 1) for r in range(rounds)) + " |", "|---|" + "---:|" * rounds]
    lines += [f"| {name} | " + " | ".join(f"{c['mean']:+.2f} ± {c['std']:.2f}" for c in column) + " |"
              for name, column in zip(SERIES, columns)]
    return lines + [""]


def report(results: dict) -> str:
    lines = ["# Over-optimisation benchmark", "", f"command: `{results['command']}`", "",
             f"machine: {results['machine']}", ""]
    for method, runs in results["runs"].items():
        lines += [f"## {method}", ""]
        for seed, run in runs.items():
            v = run["verdict"]
            lines += series_table(f"{method}, seed {seed} ({run['seconds']:.0f} s): over-optimised = {v['overoptimised']} "
                                  f"(peak round {v['peak_round']}, rise {v['rise']:+.2f}, fall {v['fall']:+.2f}, fixed proxy "
                                  f"after peak {v['fixed_proxy_after_peak']:+.2f}, overall {v['fixed_proxy_overall']:+.2f})",
                                  run["series"])
        shown = sum(r["verdict"]["overoptimised"] for r in runs.values())
        lines += [f"over-optimised in {shown} of {len(runs)} seeds", ""]
        lines += spread_table(method, {seed: r["series"] for seed, r in runs.items()})
    for pair, comparison in results["paired"].items():
        lines += [f"## paired: {pair}", "", "| measure | per seed | mean | std | favour B | favour A |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, c in comparison.items():
            per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in c["per_seed"].items())
            lines.append(f"| {name} | {per_seed} | {c['mean']:+.3f} | {c['std']:.3f} | {c['seeds_favouring_b']} | "
                         f"{c['seeds_favouring_a']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=["vanilla", "metarm"])
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar="LABEL=KEY=VALUE,...",
                        help="another arm, e.g. metarm_eta0.1=reward.method=metarm,reward.eta=0.1 (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="conf/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the config's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for every run (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="read runs already finished in OUT instead of rerunning")
    args = parser.parse_args()

    results = {"command": " ".join([Path(sys.executable).name] + sys.argv), "runs": {}, "paired": {},
               "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs, "
                          f"{platform.platform()}"}
    labels = arms(args.methods, args.variants)
    for method, overrides in labels.items():
        results["runs"][method] = {}
        for seed in args.seeds:
            run_dir = (args.out / "runs" / f"{method}_s{seed}").resolve()
            wall = Path(str(run_dir) + ".seconds")
            if not (args.reuse and (run_dir / "reward_model").exists()):
                seconds = run_one(run_command(args.config, run_dir, overrides, seed, args.rounds, args.sets), run_dir)
                wall.write_text(f"{seconds:.1f}\n")
            seconds = float(wall.read_text()) if wall.exists() else float("nan")
            series = run_series(run_dir)
            results["runs"][method][seed] = {"seconds": seconds, "series": series, "verdict": verdict(series)}
            print(f"{method} seed {seed}: {seconds:.0f} s, {results['runs'][method][seed]['verdict']}", flush=True)
    names = list(labels)
    for i, a in enumerate(names[:1]):  # every other arm against the first (vanilla)
        for b in names[i + 1:]:
            results["paired"][f"B={b} - A={a}"] = paired(
                {s: r["series"] for s, r in results["runs"][a].items()}, {s: r["series"] for s, r in results["runs"][b].items()})
    text = report(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overoptimisation.md").write_text(text + "\n")
    (args.out / "overoptimisation.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
