"""Experiment A: reward-model accuracy out of distribution on real data, vanilla vs MetaRM (and bilevel reward
learning), paired over seeds.

    .venv/bin/python benchmarks/experiment_a.py --seeds 0 1 2 --out /tmp/expA/main
        [--pairs tldr-cnndm hh-helpful-harmless tldr-subreddits] [--etas 5e-6 1e-3] [--max-steps 30]
        [--bilevel] [--bilevel-variant NAME=KEY=VALUE;...] [--bilevel-layers 2] [--no-metarm]
        [--prompt-tokens 32] [--response-tokens 48] [--preference-records 1200] [--target-records N]
        [--jobs 2] [--threads 1] [--reuse] [--set key=value ...]

Domain pairs (preference data -> target domain; MetaRM's meta data are the target domain's responses grouped by
prompt, without their labels; target accuracy is measured on the same target file with its labels):
  tldr-cnndm           conf/rm_tldr.yaml  TL;DR Reddit summaries  -> CNN/DailyMail summaries
  hh-helpful-harmless  conf/rm_hh.yaml    HH-RLHF helpful-base     -> HH-RLHF harmless-base
  tldr-subreddits      conf/rm_tldr.yaml  TL;DR without 4 subreddits -> those 4 (AskReddit, tifu, personalfinance,
                                          legaladvice): leave-subreddits-out
Every (pair, method, seed) is one subprocess `python -m rayrlhf.train_rm CONF overrides...`, its run directory
OUT/runs/PAIR/METHOD/seedS (metrics.jsonl, config.yaml, train_rm.log). Every method of one seed shares the
seed, hence the train/held-out split, the initial head and (vanilla, MetaRM) the order of the preference batches:
the comparison is paired. `--etas` adds one MetaRM variant per eta (default: the config's eta only); vanilla runs
once per seed. `--bilevel` adds bilevel reward learning (Jia 2024): meta-training across the training side's
domains (its subreddits; HH helpful is one domain) with SmolLM2-135M as the inner problem's policy, adapting its
last `--bilevel-layers` blocks, the same number of RM steps; it never sees the target domain.
Writes OUT/experiment_a.json and OUT/experiment_a.md and prints the markdown.
Standard library only (the runs themselves use the project's venv).
"""
import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DomainPair:
    """One out-of-distribution setting: its config and a description of both domains."""

    config: str
    source: str
    target: str
    target_records: Optional[int]
    """Default data.meta/target_eval.max_records (None: the whole target file)."""
    domain_by: str
    """reward.bilevel.domain_by of the bilevel variant: how the training side splits into domains."""
    overrides: Tuple[str, ...] = ()
    """What makes the pair out of its config (every method)."""


HELD_OUT_SUBREDDITS = "[AskReddit, tifu, personalfinance, legaladvice]"
TLDR_FILE = "data/tldr/comparisons_batch13.jsonl"
PAIRS: Dict[str, DomainPair] = {
    "tldr-cnndm": DomainPair("conf/rm_tldr.yaml", "TL;DR (Reddit posts)", "CNN/DailyMail (news)", 300, "subreddit"),
    "hh-helpful-harmless": DomainPair("conf/rm_hh.yaml", "HH-RLHF helpful-base", "HH-RLHF harmless-base", 300, "none"),
    "tldr-subreddits": DomainPair(
        "conf/rm_tldr.yaml", "TL;DR without 4 subreddits", f"TL;DR {HELD_OUT_SUBREDDITS}", None, "subreddit",
        (f"data.preference.exclude_subreddits={HELD_OUT_SUBREDDITS}",
         f"data.meta={{format: tldr, path: {TLDR_FILE}, subreddits: {HELD_OUT_SUBREDDITS}}}",
         f"data.target_eval={{format: tldr, path: {TLDR_FILE}, subreddits: {HELD_OUT_SUBREDDITS}}}",
         "reward.samples_per_prompt=2")),  # a TL;DR post has one comparison (2 summaries) as a rule
}
METRICS = ("eval_accuracy", "target_accuracy", "reward_difference_variance")


@dataclass
class Run:
    """One subprocess: a domain pair, a method variant (vanilla, metarm or metarm@eta) and a seed."""

    pair: str
    variant: str
    seed: int
    overrides: List[str]
    run_dir: Path
    result: Dict[str, object] = field(default_factory=dict)


# ---- planning ------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (sizes, seeds, variants, extra overrides)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="output folder (run directories, JSON, markdown)")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--etas", type=float, nargs="*", default=[],
                        help="MetaRM variants, one per eta (default: the config's eta, variant 'metarm')")
    parser.add_argument("--no-vanilla", action="store_true", help="skip vanilla runs (no paired comparison)")
    parser.add_argument("--no-metarm", action="store_true", help="skip MetaRM runs")
    parser.add_argument("--bilevel", action="store_true", help="add bilevel reward learning (variant 'bilevel')")
    parser.add_argument("--bilevel-variant", dest="bilevel_variants", action="append", default=[],
                        metavar="NAME=KEY=VALUE[;KEY=VALUE...]",
                        help="one more bilevel variant, 'bilevel:NAME', with these overrides (repeatable; implies --bilevel "
                             "settings, e.g. vw1=reward.bilevel.vanilla_weight=1)")
    parser.add_argument("--bilevel-layers", type=int, default=2,
                        help="reward.bilevel.policy_layers: the policy blocks the inner problem adapts (0: all)")
    parser.add_argument("--max-steps", type=int, default=30, help="reward.max_steps (0: the config's epochs)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="data.max_prompt_tokens (0: config's)")
    parser.add_argument("--response-tokens", type=int, default=48, help="data.max_response_tokens (0: config's)")
    parser.add_argument("--preference-records", type=int, default=1200,
                        help="data.preference.max_records, before the train/held-out split (0: all; TL;DR has 1,097)")
    parser.add_argument("--target-records", type=int, default=-1,
                        help="data.meta and data.target_eval max_records (-1: the per-pair default, 300 of each target; 0: all)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train_rm override for every run (repeatable); PAIR:KEY=VALUE for one pair")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores // jobs)")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose run_dir already has a final evaluation")
    return parser.parse_args(argv)


def size_overrides(args: argparse.Namespace, pair: DomainPair) -> List[str]:
    """The train_rm overrides that shrink a pair's config to the requested size."""
    overrides = []
    if args.max_steps:
        overrides.append(f"reward.max_steps={args.max_steps}")
    if args.prompt_tokens:
        overrides.append(f"data.max_prompt_tokens={args.prompt_tokens}")
    if args.response_tokens:
        overrides.append(f"data.max_response_tokens={args.response_tokens}")
    if args.preference_records:
        overrides.append(f"data.preference.max_records={args.preference_records}")
    target_records = pair.target_records if args.target_records < 0 else (args.target_records or None)
    if target_records:
        overrides += [f"data.meta.max_records={target_records}", f"data.target_eval.max_records={target_records}"]
    return overrides


def extra_overrides(extra: Sequence[str], pair_name: str) -> List[str]:
    """The --set overrides that apply to a pair: plain KEY=VALUE, or PAIR:KEY=VALUE for that pair only."""
    chosen = []
    for item in extra:
        prefix, sep, rest = item.partition(":")
        if sep and prefix in PAIRS and "=" not in prefix:
            if prefix == pair_name:
                chosen.append(rest)
        else:
            chosen.append(item)
    return chosen


def variants(args: argparse.Namespace, pair: DomainPair) -> List[Tuple[str, List[str]]]:
    """(name, overrides) of each method variant: vanilla, then metarm (config eta) or metarm@eta per --etas, then
    bilevel."""
    chosen = [] if args.no_vanilla else [("vanilla", ["reward.method=vanilla"])]
    if args.no_metarm:
        pass
    elif not args.etas:
        chosen.append(("metarm", ["reward.method=metarm"]))
    else:
        chosen += [(f"metarm@{eta:g}", ["reward.method=metarm", f"reward.eta={eta!r}"]) for eta in args.etas]
    bilevel = bilevel_overrides(pair.domain_by, args.bilevel_layers)
    if args.bilevel:
        chosen.append(("bilevel", bilevel))
    chosen += [(f"bilevel:{name}", bilevel + overrides) for name, overrides in map(parse_variant, args.bilevel_variants)]
    return chosen


def bilevel_overrides(domain_by: str, policy_layers: int) -> List[str]:
    """train_rm overrides of bilevel reward learning on real preference data: SmolLM2 as the inner problem's policy,
    adapting its last policy_layers blocks (0: all), the pairs split into domains by domain_by."""
    # TL;DR and HH prompts have one comparison each as a rule: 2 responses per support prompt
    return (["reward.method=bilevel", "policy.source=smollm2", "reward.samples_per_prompt=2",
             f"reward.bilevel.domain_by={domain_by}"]
            + ([f"reward.bilevel.policy_layers={policy_layers}"] if policy_layers else []))


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """'NAME=KEY=VALUE;KEY=VALUE' -> (NAME, [KEY=VALUE, ...]); exits with status 2 on a malformed one."""
    name, sep, rest = text.partition("=")
    overrides = [item.strip() for item in rest.split(";") if item.strip()]
    if not (sep and name.strip() and overrides and all("=" in item for item in overrides)):
        print(f"--bilevel-variant {text!r}: expected NAME=KEY=VALUE[;KEY=VALUE...], "
              "e.g. vw1=reward.bilevel.vanilla_weight=1", file=sys.stderr)
        raise SystemExit(2)
    return name.strip(), overrides


def plan_runs(args: argparse.Namespace, out: Path) -> List[Run]:
    """Every (pair, variant, seed) with its overrides and run directory."""
    runs = []
    for pair_name in args.pairs:
        pair = PAIRS[pair_name]
        shared = list(pair.overrides) + size_overrides(args, pair) + extra_overrides(args.extra, pair_name)
        for variant, method in variants(args, pair):
            for seed in args.seeds:
                run_dir = out / "runs" / pair_name / variant.replace("@", "_eta").replace(":", "_") / f"seed{seed}"
                overrides = shared + method + [f"seed={seed}", f"run_dir={run_dir}"]
                runs.append(Run(pair_name, variant, seed, overrides, run_dir))
    return runs


# ---- running -------------------------------------------------------------------------------------------------
def command_of(run: Run) -> List[str]:
    """The train_rm command line of a run."""
    return [sys.executable, "-m", "rayrlhf.train_rm", PAIRS[run.pair].config, *run.overrides]


def run_environment(threads: int) -> Dict[str, str]:
    """The subprocess environment: torch extension cache and one thread budget per run."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    return env


def final_evaluation(run_dir: Path) -> Optional[Tuple[dict, dict, List[dict]]]:
    """(evaluation before training, after training, training records) from metrics.jsonl, or None if unfinished."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in records if r["phase"] == "eval"]
    if len(evals) < 2 or "steps" not in evals[-1]:
        return None
    return evals[0], evals[-1], [r for r in records if r["phase"] == "train"]


def execute(run: Run, threads: int, reuse: bool) -> Run:
    """Run one train_rm subprocess (unless reusable), log its output, and read its result into run.result."""
    if not (reuse and final_evaluation(run.run_dir)):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        started = time.perf_counter()
        with open(run.run_dir / "train_rm.log", "w") as log:
            log.write("$ " + shlex.join(command_of(run)) + "\n")
            log.flush()
            code = subprocess.run(command_of(run), cwd=ROOT, env=run_environment(threads), stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        (run.run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        if code:
            run.result = {"error": f"exit {code}, see {run.run_dir / 'train_rm.log'}"}
            return run
    run.result = read_result(run.run_dir)
    return run


def read_result(run_dir: Path) -> Dict[str, object]:
    """The numbers a run reports: accuracies and meta reward-difference variance before/after, steps, times."""
    found = final_evaluation(run_dir)
    if found is None:
        return {"error": f"no final evaluation in {run_dir / 'metrics.jsonl'}"}
    before, after, train = found
    result = {key: after.get(key) for key in METRICS}
    result.update({f"{key}_before": before.get(key) for key in METRICS})
    result.update({key: after.get(key) for key in ("eval_pairs", "target_pairs", "steps", "train_seconds")})
    differences = [r["difference_loss"] for r in train if r.get("difference_loss") is not None]
    result["mean_difference_loss"] = statistics.fmean(differences) if differences else None
    wall = run_dir / "wall_seconds.txt"
    result["wall_seconds"] = float(wall.read_text()) if wall.exists() else None
    return result


def execute_all(runs: List[Run], jobs: int, threads: int, reuse: bool) -> None:
    """Run every run, `jobs` at a time, printing one line per finished run."""
    def one(run: Run) -> Run:
        execute(run, threads, reuse)
        shown = run.result.get("error") or (f"held-out {run.result['eval_accuracy']:.4f}  target "
                                            f"{run.result['target_accuracy']:.4f}  ({run.result['wall_seconds'] or 0:.0f} s)")
        print(f"[{time.strftime('%H:%M:%S')}] {run.pair} {run.variant} seed {run.seed}: {shown}", file=sys.stderr, flush=True)
        return run

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, runs))


# ---- statistics ----------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(runs: List[Run]) -> List[dict]:
    """Per (pair, variant): mean and std over seeds of each metric."""
    rows = []
    for pair, variant in dict.fromkeys((r.pair, r.variant) for r in runs):
        done = [r for r in runs if r.pair == pair and r.variant == variant and "error" not in r.result]
        row = {"pair": pair, "variant": variant, "seeds": len(done)}
        for key in METRICS + ("target_accuracy_before",):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r.result[key] for r in done])
        rows.append(row)
    return rows


def paired(runs: List[Run], metric: str = "target_accuracy") -> List[dict]:
    """Per pair and method variant: per-seed method - vanilla of `metric` over seeds both finished; mean, std,
    standard error and how many seeds favour each method."""
    rows = []
    finished = {(r.pair, r.variant, r.seed): r.result for r in runs if "error" not in r.result}
    for pair, variant in dict.fromkeys((r.pair, r.variant) for r in runs if r.variant != "vanilla"):
        seeds = sorted(s for (p, v, s) in finished if p == pair and v == variant and (pair, "vanilla", s) in finished)
        deltas = [finished[(pair, variant, s)][metric] - finished[(pair, "vanilla", s)][metric] for s in seeds]
        mean, std = mean_std(deltas)
        rows.append({"pair": pair, "variant": variant, "metric": metric, "seeds": seeds, "deltas": deltas,
                     "mean": mean, "std": std, "stderr": std / math.sqrt(len(deltas)) if len(deltas) > 1 else math.nan,
                     "method_better": sum(d > 0 for d in deltas), "vanilla_better": sum(d < 0 for d in deltas),
                     "ties": sum(d == 0 for d in deltas)})
    return rows


# ---- reporting -----------------------------------------------------------------------------------------------
def fmt(value: Optional[float], digits: int = 4) -> str:
    """A number for a table cell ('-' for missing or nan)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def per_seed_table(runs: List[Run]) -> List[str]:
    """Markdown rows: every run's held-out (in-distribution) beside target (out-of-distribution) accuracy."""
    lines = ["| pair | method | seed | held-out acc (ID) | target acc (OOD) | target acc before | meta r-diff var after | "
             "mean J (train) | steps | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        res = run.result
        if "error" in res:
            lines.append(f"| {run.pair} | {run.variant} | {run.seed} | error: {res['error']} | | | | | | |")
            continue
        lines.append(f"| {run.pair} | {run.variant} | {run.seed} | {fmt(res['eval_accuracy'])} | {fmt(res['target_accuracy'])} | "
                     f"{fmt(res['target_accuracy_before'])} | {fmt(res['reward_difference_variance'], 5)} | "
                     f"{fmt(res['mean_difference_loss'])} | {res['steps']} | {fmt(res['wall_seconds'], 0)} |")
    return lines


def summary_table(rows: List[dict]) -> List[str]:
    """Markdown rows: mean ± std over seeds per (pair, method)."""
    lines = ["| pair | method | seeds | held-out acc (ID) | target acc (OOD) | meta r-diff var after |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{fmt(row[f'{k}_mean'], 5 if 'variance' in k else 4)} ± {fmt(row[f'{k}_std'], 5 if 'variance' in k else 4)}"
                 for k in METRICS]
        lines.append(f"| {row['pair']} | {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return lines


def paired_table(rows: List[dict]) -> List[str]:
    """Markdown rows: the paired per-seed differences method - vanilla."""
    lines = ["| pair | method | metric | per-seed Δ (method − vanilla) | mean Δ | std | s.e. "
             "| seeds method better / vanilla better / tied |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        deltas = ", ".join(f"s{s}: {d:+.4f}" for s, d in zip(row["seeds"], row["deltas"]))
        lines.append(f"| {row['pair']} | {row['variant']} | {row['metric']} | {deltas} | {fmt(row['mean'], 4)} | "
                     f"{fmt(row['std'], 4)} | {fmt(row['stderr'], 4)} | {row['method_better']} / {row['vanilla_better']} / {row['ties']} |")
    return lines


def machine() -> Dict[str, object]:
    """What the runs ran on (cores, platform, load average now)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0]}


def markdown(report: dict, runs: List[Run]) -> str:
    """The whole report as markdown."""
    lines = ["# Experiment A: OOD reward-model accuracy, vanilla vs MetaRM and bilevel reward learning", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine_start']['cpus']} CPUs, {report['machine_start']['platform']}; load average at start "
             f"{report['machine_start']['loadavg']}, at end {report['machine_end']['loadavg']}. Wall time {report['wall_seconds']:.0f} s "
             f"({report['jobs']} runs at once, {report['threads']} torch thread(s) each).", "",
             "Pairs: " + "; ".join(f"`{n}` = {PAIRS[n].source} -> {PAIRS[n].target} ({PAIRS[n].config})" for n in report["pairs"]), "",
             "Overrides per pair: " + "; ".join(f"`{n}`: `{' '.join(o)}`" for n, o in report["overrides"].items()), "",
             "## Per seed", "", *per_seed_table(runs), "",
             "## Mean ± std over seeds (sample std)", "", *summary_table(report["summary"]), "",
             "## Paired comparison (same seed: same split, initial head, batch order)", "",
             *paired_table(report["paired_target"]), *paired_table(report["paired_eval"])[2:], ""]
    return "\n".join(lines)


def json_safe(value):
    """A copy of `value` with nan/inf floats as None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runs = plan_runs(args, out)
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
              "pairs": args.pairs, "jobs": args.jobs, "threads": threads, "machine_start": machine(),
              "overrides": {n: list(PAIRS[n].overrides) + size_overrides(args, PAIRS[n]) + extra_overrides(args.extra, n)
                            for n in args.pairs}}
    print(f"{len(runs)} runs, {args.jobs} at a time, {threads} thread(s) each -> {out}", file=sys.stderr)
    started = time.perf_counter()
    execute_all(runs, args.jobs, threads, args.reuse)
    report.update({"wall_seconds": time.perf_counter() - started, "machine_end": machine(), "summary": summarise(runs),
                   "paired_target": paired(runs, "target_accuracy"), "paired_eval": paired(runs, "eval_accuracy"),
                   "runs": [{"pair": r.pair, "variant": r.variant, "seed": r.seed, "overrides": r.overrides, **r.result}
                            for r in runs]})
    (out / "experiment_a.json").write_text(json.dumps(json_safe(report), indent=1, default=str))
    text = markdown(report, runs)
    (out / "experiment_a.md").write_text(text + "\n")
    print(text)
    return 1 if any("error" in r.result for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
