"""Out-of-distribution policy experiment (issue 18): PPO vs group invariant learning (GIL) vs GIL without its dynamic
KL, trained on one domain's prompts and judged on another domain's prompts, paired over seeds.

    .venv/bin/python benchmarks/ood_policy.py --setting tldr-cnndm --seeds 0 1 --out DIR
        [--arms ppo gil gil_no_dynamic_kl] [--rm-methods vanilla] [--ppo-prompts source] [--rounds 1] [--steps 4]
        [--policy-lr 1e-4] [--prompts 24] [--samples 2] [--rm-steps 100] [--judge-steps 100] [--reuse] [--set key=value ...]

The meta-test of issue 19 (an RM learned on the source domain only, frozen, PPO on the target's prompts, judged there):
    .venv/bin/python benchmarks/ood_policy.py --setting hh-helpful-harmless --arms ppo \
        --rm-methods vanilla metarm bilevel --ppo-prompts target --seeds 0 1 2 --out DIR

Settings (the run's config; its prompts; the prompts it is judged on):
  tldr-cnndm           conf/tldr_cpu.yaml  TL;DR Reddit posts   -> CNN/DailyMail articles (data.target_eval's prompts)
  hh-helpful-harmless  conf/hh_cpu.yaml    HH-RLHF helpful-base -> HH-RLHF harmless-base
The judge is a reward model (MiniLM, vanilla Bradley-Terry, `python -m rayrlhf.train_rm`, trained once into OUT/judge)
that no run uses: for TL;DR -> CNN/DM a stronger TL;DR RM (every pair, 3 epochs) measured on the CNN/DM pairs; for
HH one trained on the harmless pairs, measured on a held-out fifth of them (SETTINGS says why).
Each (arm, seed) is `python -m rayrlhf.run CONFIG <size> <arm> seed=S` into OUT/runs/ARM/seedS (transformers engine,
the proxy RM, MiniLM trained once on the source domain into OUT/proxy, frozen, the same for every arm; with
--rm-methods one proxy per method, OUT/proxy_METHOD, and the runs OUT/runs/ARM+METHOD/seedS), then
`python -m rayrlhf.eval RUN_DIR evaluation.prompt_set=target evaluation.judge=reward_model ...`: the final policy
against the initial (SFT) one on the target prompts. Runs of one seed share the seed: the same initial models, SFT,
prompt order and evaluation prompts (paired).
Writes OUT/ood_policy.json and OUT/ood_policy.md and prints the markdown. Standard library only.
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from experiment_a import bilevel_overrides, fmt, json_safe, machine, mean_std, run_environment

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "ppo": ["ppo.group_invariant.enabled=false"],
    "gil": ["ppo.group_invariant.enabled=true"],
    "gil_no_dynamic_kl": ["ppo.group_invariant.enabled=true", "ppo.group_invariant.adaptive_kl=false"],
}
# how the proxy RM learns from the source domain (issue 19's meta-test compares them; MetaRM's meta data are the
# target's unlabelled responses, as the RM configs name them; bilevel's are experiment_a's, with the setting's
# domains); every method but vanilla adds "+METHOD" to the run's key
RM_METHODS = {
    "vanilla": ["reward.method=vanilla", "data.meta=null"],
    "metarm": ["reward.method=metarm"],
    "bilevel": ["data.meta=null"],
}
BILEVEL_POLICY_LAYERS = 2
"""The policy blocks a bilevel proxy's inner problem adapts (experiment_a's --bilevel-layers default)."""
POLICY_METRICS = ("win_rate", "tie_rate", "lose_rate", "judge_score", "kl_to_initial", "length_tokens")


@dataclass(frozen=True)
class Setting:
    config: str
    """The run's config (its policy, prompts and data.target_eval)."""
    rm_config: str
    """The MiniLM RM config whose preference data are the source domain: the proxy's, and the judge's with judge_overrides."""
    judge_overrides: Tuple[str, ...]
    """What the judge trains on and where its accuracy is measured (`judge_accuracy`: target_accuracy or eval_accuracy)."""
    judge_accuracy: str
    description: str
    eval_overrides: Tuple[str, ...] = ()
    """What the evaluation adds to the run's config (e.g. every target prompt, where the run's config caps them)."""
    domain_by: str = "none"
    """reward.bilevel.domain_by of a bilevel proxy: how the source domain's pairs split into meta-training domains."""
    target_preference: str = ""
    """The data.preference override that makes the target domain's prompts the PPO prompts (--ppo-prompts target:
    the meta-test of a reward model learned on the source only)."""


SETTINGS: Dict[str, Setting] = {
    # a stronger RM of the source domain (every TL;DR pair, 3 epochs), measured on all of CNN/DM, which it never saw:
    # CNN/DM's own 437 pairs taught a MiniLM RM nothing (0.51 on a held-out fifth)
    "tldr-cnndm": Setting("conf/tldr_cpu.yaml", "conf/rm_tldr.yaml",
                          ("data.preference={format: tldr, path: data/tldr/comparisons_batch13.jsonl}", "data.eval_fraction=0.1",
                           "data.target_eval={format: tldr, path: data/tldr/comparisons_cnndm0.jsonl}", "reward.epochs=3"),
                          "target_accuracy", "TL;DR posts -> CNN/DM articles",
                          # the run's config keeps 64 CNN/DM pairs, which are 6 articles: judge on all 45
                          ("data.target_eval.max_records=null",), "subreddit",
                          "data.preference={format: tldr, path: data/tldr/comparisons_cnndm0.jsonl}"),
    # an RM of the target domain's labels (HH harmless-base, 2 epochs), measured on a held-out fifth of them: a
    # helpfulness RM ranks harmless pairs below chance (docs/results.md, Experiment A)
    "hh-helpful-harmless": Setting("conf/hh_cpu.yaml", "conf/rm_hh.yaml",
                                   ("data.preference={format: hh, path: data/hh/harmless-base-test.jsonl.gz}",
                                    "data.eval_fraction=0.2", "data.target_eval=null", "reward.epochs=2"),
                                   "eval_accuracy", "HH helpful -> HH harmless", (), "none",
                                   "data.preference={format: hh, path: data/hh/harmless-base-test.jsonl.gz}"),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--rm-methods", nargs="+", choices=list(RM_METHODS), default=["vanilla"],
                        help="reward.method of the frozen proxy RM, one proxy each (every arm runs against every proxy)")
    parser.add_argument("--ppo-prompts", choices=["source", "target"], default="source",
                        help="PPO on the source domain's prompts (GIL's out-of-distribution test) or on the target's "
                             "(the meta-test of an RM learned on the source only; the SFT data are then the target's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="ppo.steps_per_round")
    parser.add_argument("--policy-lr", type=float, default=1e-4,
                        help="ppo.policy_lr: the configs' 5e-7 barely moves a policy in a few CPU-sized steps, and 1e-5 "
                             "moved it 0.06-0.08 nats on HH in 4 steps, too little to change a sampled response "
                             "(docs/results.md, section 3b)")
    parser.add_argument("--prompts", type=int, default=24, help="target prompts each policy answers when judged")
    parser.add_argument("--samples", type=int, default=2, help="responses per judged prompt (evaluation.samples_per_prompt)")
    parser.add_argument("--rm-steps", type=int, default=100,
                        help="the proxy RM's steps on the source domain (30 left it at chance: 0.51 held out)")
    parser.add_argument("--judge-steps", type=int, default=100, help="the judge's reward.max_steps")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for every run (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="keep runs (and the judge) already finished in OUT")
    return parser.parse_args(argv)


def size_overrides(args: argparse.Namespace, proxy_folder: str) -> List[str]:
    """What shrinks the setting's config to minutes on a CPU (the same for every arm): SmolLM2 stays the policy
    and the critic; the RM is the proxy (MiniLM, trained once on the source domain by train_proxy) and stays frozen,
    so the arms differ in the policy's training only; prompts cut to their last 64 tokens, 24 new tokens, PPO
    without gradient checkpointing (these sequences are short), 4 prompts of meta samples (the round's
    reward-difference diagnostics only: the RM is not trained)."""
    return [f"rounds={args.rounds}", f"ppo.steps_per_round={args.steps}", f"ppo.policy_lr={args.policy_lr!r}",
            "rollout.engine=hf", "rollout.max_new_tokens=24", "data.max_prompt_tokens=64", "data.max_response_tokens=24",
            "reward.meta_prompts_per_round=4", f"reward_model={{source: {proxy_folder}}}", "ppo.critic_from_reward_model=false",
            "reward.method=vanilla",
            "reward.initial_epochs=0", "reward.train_each_round=false", "ppo.gradient_checkpointing=false",
            "ppo.micro_batch_size=4", "ppo.forward_micro_batch_size=8", "evaluation.every_rounds=0", *args.extra]


def run_logged(command: List[str], log_path: Path) -> int:
    """Run a command with its output in log_path (the command line first); its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        return subprocess.run(command, cwd=ROOT, env=run_environment(2), stdout=log, stderr=subprocess.STDOUT).returncode


def train_reward_model(config: str, folder: Path, overrides: Sequence[str], reuse: bool) -> Dict[str, object]:
    """A MiniLM RM by `python -m rayrlhf.train_rm config overrides`, trained once into folder; its final accuracies."""
    if not (reuse and (folder / "reward_model" / "config.json").is_file()):
        command = [sys.executable, "-m", "rayrlhf.train_rm", config, f"run_dir={folder}", *overrides]
        if run_logged(command, folder / "train_rm.log"):
            raise SystemExit(f"{folder.name} did not train: see {folder / 'train_rm.log'}")
    evaluations = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in evaluations if r["phase"] == "eval"][-1]
    return {"folder": str(folder / "reward_model"), "steps": final["steps"],
            **{key: final[key] for key in ("eval_accuracy", "eval_pairs", "target_accuracy", "target_pairs") if key in final}}


def train_judge(setting: Setting, args: argparse.Namespace, out: Path) -> Dict[str, object]:
    judge = train_reward_model(setting.rm_config, out / "judge", [*RM_METHODS["vanilla"], f"reward.max_steps={args.judge_steps}",
                               "data.max_prompt_tokens=64", "data.max_response_tokens=32", *setting.judge_overrides], args.reuse)
    pairs = judge["target_pairs" if setting.judge_accuracy == "target_accuracy" else "eval_pairs"]
    return {**judge, "accuracy": judge[setting.judge_accuracy], "pairs": pairs, "measured_on": setting.judge_accuracy}


def proxy_overrides(setting: Setting, method: str, rm_steps: int) -> List[str]:
    """train_rm overrides of a proxy RM learned by `method` on the source domain (the setting's RM config)."""
    by_method = RM_METHODS[method] + (bilevel_overrides(setting.domain_by, BILEVEL_POLICY_LAYERS) if method == "bilevel" else [])
    return [*by_method, f"reward.max_steps={rm_steps}", "data.max_prompt_tokens=64", "data.max_response_tokens=24",
            "reward.epochs=2"]


def train_proxy(setting: Setting, args: argparse.Namespace, out: Path, method: str) -> Dict[str, object]:
    """A frozen RM of the runs: the setting's source domain only (the judge config's preference data), args.rm_steps
    steps of `method`, its accuracy on the target domain measured where the config names one."""
    folder = out / ("proxy" if method == "vanilla" else f"proxy_{method}")
    return train_reward_model(setting.rm_config, folder, proxy_overrides(setting, method, args.rm_steps), args.reuse)


def run_key(arm: str, method: str) -> str:
    """A run's name: the PPO arm, "+METHOD" where the proxy RM is not vanilla."""
    return arm if method == "vanilla" else f"{arm}+{method}"


def run_command(setting: Setting, arm: str, seed: int, proxy: str, run_dir: Path, args: argparse.Namespace) -> List[str]:
    """The `python -m rayrlhf.run` command line of one run against the proxy RM in folder `proxy`."""
    return ([sys.executable, "-m", "rayrlhf.run", setting.config, *size_overrides(args, proxy), *ARMS[arm], f"seed={seed}",
             f"run_dir={run_dir}"] + ([setting.target_preference] if args.ppo_prompts == "target" else []))


def run_arm(setting: Setting, arm: str, method: str, seed: int, judge: str, proxy: str, args: argparse.Namespace,
            out: Path) -> Dict[str, object]:
    """One run (PPO arm `arm` against the proxy RM of `method`) and its judged evaluation; the final policy's row of
    evaluation.json, or an error. With args.reuse a finished run is kept, and so is its evaluation; its wall time is
    the one recorded when it ran (in RUN_DIR/wall_seconds.txt)."""
    key = run_key(arm, method)
    run_dir = out / "runs" / key / f"seed{seed}"
    report, timing = run_dir / "evaluation" / "evaluation.json", run_dir / "wall_seconds.txt"
    started = time.perf_counter()
    trained = not (args.reuse and (run_dir / "policy" / "config.json").is_file())
    if trained:
        timing.unlink(missing_ok=True)
        if run_logged(run_command(setting, arm, seed, proxy, run_dir, args), out / "logs" / f"{key}_seed{seed}_run.log"):
            return {"error": f"run failed: {out / 'logs' / f'{key}_seed{seed}_run.log'}"}
        report.unlink(missing_ok=True)
    if not report.is_file():
        evaluate = [sys.executable, "-m", "rayrlhf.eval", str(run_dir), "evaluation.prompt_set=target",
                    "evaluation.judge=reward_model", f"evaluation.judge_model={judge}", f"evaluation.prompts={args.prompts}",
                    f"evaluation.samples_per_prompt={args.samples}", "evaluation.embeddings=false", *setting.eval_overrides]
        if run_logged(evaluate, out / "logs" / f"{key}_seed{seed}_eval.log"):
            return {"error": f"evaluation failed: {out / 'logs' / f'{key}_seed{seed}_eval.log'}"}
        # the round checkpoints (policy, critic and their Adam states: about 6 GB a run) are not read again
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if trained:
        timing.write_text(f"{time.perf_counter() - started:.1f}\n")
    final = json.loads(report.read_text())["policies"]["final"]
    wall_seconds = float(timing.read_text()) if timing.is_file() else None  # none for a run kept from before the record
    return {**{key: final.get(key) for key in POLICY_METRICS}, "wall_seconds": wall_seconds}


def summary_line(result: Dict[str, object]) -> str:
    """A run's result in a progress line."""
    if "error" in result:
        return str(result["error"])
    return f"win {result['win_rate']:.3f} lose {result['lose_rate']:.3f} ({fmt(result['wall_seconds'], 0)} s)"


def net_wins(result: Dict[str, object]) -> Optional[float]:
    """win rate − lose rate against the initial policy."""
    return None if "error" in result else result["win_rate"] - result["lose_rate"]


def markdown(report: dict) -> str:
    runs, keys = report["runs"], [run_key(arm, method) for method in report["rm_methods"] for arm in report["arms"]]
    lines = [f"# Out-of-distribution policy experiment: {report['setting']} ({SETTINGS[report['setting']].description})", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine_start']['cpus']} CPUs, {report['machine_start']['platform']}; load average at start "
             f"{report['machine_start']['loadavg']}, at end {report['machine_end']['loadavg']}. Wall time {report['wall_seconds']:.0f} s.",
             "", f"Judge: {report['judge']['folder']}, {report['judge']['measured_on']} {report['judge']['accuracy']:.4f} "
             f"({report['judge']['pairs']} pairs). PPO prompts: the {report['ppo_prompts']} domain's. The runs' frozen proxy "
             "RMs, trained on the source domain only:", ""]
    lines += [f"- {method}: {proxy['steps']} steps, held-out accuracy {fmt(proxy['eval_accuracy'], 4)}, target "
              f"{fmt(proxy.get('target_accuracy'), 4)} ({proxy['folder']})" for method, proxy in report["proxies"].items()]
    lines += ["", f"Overrides of every run (the proxy's folder varies): `{' '.join(report['overrides'])}`.", "",
              "## Per run (final policy against the initial one, on the target prompts)", "",
              "| arm | seed | win | tie | lose | judge score | KL to initial | length | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for key, result in runs.items():
        arm, seed = key.split("/")
        if "error" in result:
            lines.append(f"| {arm} | {seed} | error: {result['error']} | | | | | | |")
            continue
        lines.append(f"| {arm} | {seed} | " + " | ".join(fmt(result[m], 3) for m in POLICY_METRICS)
                     + f" | {fmt(result['wall_seconds'], 0)} |")
    lines += ["", "## Mean ± std over seeds, and paired against ppo (same seed)", "",
              "| arm | win − lose | judge score | KL to initial | Δ(win − lose) vs ppo, per seed | mean Δ |", "|---|---|---|---|---|---|"]
    for arm in keys:
        done = {seed: runs[f"{arm}/{seed}"] for seed in report["seeds"] if "error" not in runs[f"{arm}/{seed}"]}
        cells = [mean_std([net_wins(r) for r in done.values()]), mean_std([r["judge_score"] for r in done.values()]),
                 mean_std([r["kl_to_initial"] for r in done.values()])]
        deltas = [net_wins(r) - net_wins(runs[f"ppo/{seed}"]) for seed, r in done.items()
                  if f"ppo/{seed}" in runs and "error" not in runs[f"ppo/{seed}"]] if arm != "ppo" else []
        lines.append(f"| {arm} | " + " | ".join(f"{fmt(m, 3)} ± {fmt(s, 3)}" for m, s in cells)
                     + f" | {' '.join(f'{d:+.3f}' for d in deltas) or '-'} | {fmt(mean_std(deltas)[0], 3) if deltas else '-'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    setting = SETTINGS[args.setting]
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv),
              "setting": args.setting, "seeds": args.seeds, "arms": args.arms, "rm_methods": args.rm_methods,
              "ppo_prompts": args.ppo_prompts, "machine_start": machine()}
    started = time.perf_counter()
    report["judge"] = train_judge(setting, args, out)
    print(f"judge: {report['judge']['measured_on']} {report['judge']['accuracy']:.4f}", file=sys.stderr, flush=True)
    report["proxies"] = {}
    for method in args.rm_methods:
        report["proxies"][method] = train_proxy(setting, args, out, method)
        print(f"proxy RM ({method}): {json.dumps(report['proxies'][method])}", file=sys.stderr, flush=True)
    report["overrides"] = size_overrides(args, "PROXY")
    report["runs"] = {}
    for seed in args.seeds:
        for method in args.rm_methods:
            for arm in args.arms:
                result = run_arm(setting, arm, method, seed, report["judge"]["folder"],
                                 report["proxies"][method]["folder"], args, out)
                report["runs"][f"{run_key(arm, method)}/{seed}"] = result
                print(f"[{time.strftime('%H:%M:%S')}] {run_key(arm, method)} seed {seed}: {summary_line(result)}",
                      file=sys.stderr, flush=True)
    report.update({"wall_seconds": time.perf_counter() - started, "machine_end": machine()})
    (out / "ood_policy.json").write_text(json.dumps(json_safe(report), indent=1, default=str))
    text = markdown(report)
    (out / "ood_policy.md").write_text(text + "\n")
    print(text)
    return 1 if any("error" in r for r in report["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
