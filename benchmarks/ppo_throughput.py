"""Samples/s of the round loop's PPO step (generate, score, update, sync) for configurations side by side.

    .venv/bin/python benchmarks/ppo_throughput.py [--repeats 3] [--steps 6] [--variant NAME=OVERRIDES ...]

The workload (issue 14's): a 4-layer, 256-wide policy, critic and reward model (16M parameters each with the
GPT-2 tokenizer's 50,257 tokens), 16 TL;DR prompts cut to their last 32 tokens, 32 new tokens sampled at
temperature 0.7, one PPO epoch of 2 mini-batches of 8, AdamW lr 3e-6, float32. Every flag changes it.

Each variant is a whole `python -m rayrlhf.run` (its own Ray instance, actors, vLLM) with overrides; the
variants run alternately, `--repeats` times each, so machine noise hits them alike. A run's first PPO step is
a warm-up and is not counted; samples/s of a step = rollout rows / (generation + scoring + PPO update + weight
sync seconds), read from its metrics.jsonl. Default variants: one torch thread per actor (the old behaviour)
against every core of the node per actor (resources.torch_threads unset).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generation_seconds", "scoring_seconds", "ppo_seconds", "weight_sync_seconds")


def workload(args) -> list:
    gpt2 = str(ROOT.parent / "shared" / "tokenizers" / "gpt2") if args.tokenizer is None else args.tokenizer
    tiny = f"{{hidden_size: {args.width}, num_layers: {args.layers}, num_heads: {args.width // 64}, intermediate_size: {4 * args.width}}}"
    model = f"{{source: tiny, tokenizer: {gpt2}, tiny: {tiny}}}"
    return [
        f"policy={model}", f"reward_model={model}", "rounds=1", f"ppo.steps_per_round={args.steps + 1}",
        "data.preference={format: tldr, path: data/tldr/comparisons_batch13.jsonl}", "data.target_eval=null",
        f"data.max_prompt_tokens={args.prompt_tokens}", f"rollout.max_new_tokens={args.new_tokens}",
        f"data.max_response_tokens={args.new_tokens}", "rollout.temperature=0.7", "rollout.top_p=1.0",
        f"ppo.rollout_batch_size={args.prompts}", "rollout.n_per_prompt=1", "ppo.epochs=1", "ppo.mini_batches=2",
        "ppo.policy_lr=3e-6", "ppo.critic_lr=3e-6", "sft.steps=0",
        # the RM phase is not measured: as little of it as the loop allows
        "reward.method=vanilla", "reward.initial_epochs=0", "reward.max_steps=1", "reward.batch_size=2",
        "reward.meta_prompts_per_round=2", "reward.samples_per_prompt=2", "data.eval_fraction=0.01",
        "resources.cpus_per_actor=0.5", f"rollout.engine={args.engine}",
    ]


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload's flags (also benchmarks/ppo_vs_trl.py's)."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="counted PPO steps per run (one more warms up)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: ../shared/tokenizers/gpt2)")


def run_variant(overrides: list, run_dir: Path) -> list:
    """Every counted PPO step's metrics of one whole run."""
    command = [sys.executable, "-m", "rayrlhf.run", "conf/tiny.yaml", f"run_dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("phase") == "ppo"][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--variant", action="append", default=None, metavar="NAME=OVERRIDES",
                        help="a named variant: space-separated config overrides (repeatable)")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else {
        "1 thread per actor": "resources.torch_threads=1", "all cores per actor": ""}
    base = workload(args)
    steps = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for index, (name, extra) in enumerate(variants.items()):
                run_dir = Path(folder) / f"run_{repeat}_{index}"
                steps[name] += run_variant(base + extra.split(), run_dir)
                print(f"repeat {repeat + 1}/{args.repeats} {name}: done", file=sys.stderr)
    report(args, variants, steps)


def samples_per_second(step: dict, rows: int) -> float:
    return rows / sum(step[phase] for phase in PHASES)


def report(args, variants: dict, steps: dict) -> None:
    rows = args.prompts
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}")
    print(f"workload: {args.prompts} prompts x {args.new_tokens} new tokens, {args.layers} layers x {args.width} wide, "
          f"engine {args.engine}; {args.repeats} runs x {args.steps} counted steps per variant, alternating\n")
    header = "| variant | samples/s median (range) | " + " | ".join(p.removesuffix("_seconds") + " s" for p in PHASES) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    baseline = None
    for name in variants:
        rates = [samples_per_second(step, rows) for step in steps[name]]
        median = statistics.median(rates)
        baseline = baseline or median
        phases = " | ".join(f"{statistics.median(s[p] for s in steps[name]):.3f}" for p in PHASES)
        print(f"| {name} | {median:.2f} ({min(rates):.2f}-{max(rates):.2f}), {median / baseline:.2f}x | {phases} |")


if __name__ == "__main__":
    main()
