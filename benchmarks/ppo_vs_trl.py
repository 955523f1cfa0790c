"""rayrlhf's PPO step against Hugging Face TRL 1.12's PPOTrainer on the same workload, on this machine, in one
invocation (issue 20).

    .venv/bin/python benchmarks/ppo_vs_trl.py [--repeats 3] [--steps 6] [--out benchmarks/results/ppo_vs_trl.md]
        [--trl-venv .venv-trl] [--prompts 16] [--prompt-tokens 32] [--new-tokens 32] [--layers 4] [--width 256]
        [--lr 3e-6] [--kl-coef 0.05] [--engine auto|vllm|hf] [--rayrlhf-set KEY=VALUE ...]
        [--variant NAME="KEY=VALUE KEY=VALUE" ...]

The workload (the issue's): a 4-layer, 256-wide Llama-shaped policy, value model and reward model (random
initialisation, the GPT-2 tokenizer's 50,257 tokens), 16 TL;DR prompts cut to their last 32 tokens, 32 new tokens
sampled at temperature 0.7, one PPO epoch of 2 mini-batches of 8, AdamW lr 3e-6, float32. Every flag changes it.

rayrlhf: a whole `python -m rayrlhf.run` (benchmarks/ppo_throughput.py's workload: its Ray instance, actors and
rollout engine); a step = generation + scoring + PPO update + weight sync, from its metrics.jsonl. TRL: one
process of benchmarks/trl_ppo_side.py in TRL's own venv (created here on first use with TRL 1.12.0, the last TRL
with PPO, and this venv's torch, transformers, accelerate and datasets versions); an iteration = the time between
two step ends. `--variant` adds rayrlhf configurations (one change at a time, e.g. `async="rollout.asynchronous=true"`)
beside the plain one. TRL and every variant run alternately, `--repeats` times each, so the machine's noise hits all
alike; each run's first step warms up and is not counted. Samples/s = rollout rows / step seconds. Peak memory: TRL's process;
rayrlhf's largest actor and the sum over its actors (each actor is its own process).
"""
import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from ppo_throughput import PHASES, add_workload_arguments, run_variant, workload

ROOT = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.12.0"
SHARED_PACKAGES = ("torch", "transformers", "accelerate", "datasets")
"""Installed into TRL's venv at the versions this venv has, so both sides run the same kernels."""
TRL_PHASES = ("generation", "rollout_rest", "optimisation")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--lr", type=float, default=3e-6)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--trl-venv", default=str(ROOT / ".venv-trl"))
    parser.add_argument("--rayrlhf-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override of every rayrlhf run (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="KEY=VALUE ..."',
                        help="a rayrlhf variant beside the plain one: space-separated overrides (repeatable)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    return parser.parse_args(argv)


def trl_python(venv: Path) -> Path:
    """TRL's venv's python, the venv created (TRL 1.12.0 beside this venv's shared packages) when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '%s')" % TRL_VERSION]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating TRL's venv in {venv} (TRL {TRL_VERSION}; a few minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in SHARED_PACKAGES]
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}", *pins], check=True)
    return python


def prompt_ids(args, tokenizer_folder: str) -> List[List[int]]:
    """The TL;DR prompts as the project tokenises them (no special tokens, the last prompt_tokens kept)."""
    from transformers import AutoTokenizer

    from rayrlhf.config import DataSource, SyntheticTask
    from rayrlhf.data.sources import load_preference_pairs

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    source = DataSource(format="tldr", path=str(ROOT / "data/tldr/comparisons_batch13.jsonl"), max_records=400)
    prompts = list(dict.fromkeys(load_preference_pairs(source, SyntheticTask(), 0).pairs["prompt"]))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-args.prompt_tokens:] for p in prompts]
    return [ids for ids in encoded if len(ids) == args.prompt_tokens][: 4 * args.prompts]


def run_trl(python: Path, workload_file: Path, out_file: Path) -> List[Dict[str, float]]:
    """The counted iterations of one TRL run: samples/s and the phases in seconds."""
    command = [str(python), str(ROOT / "benchmarks" / "trl_ppo_side.py"), str(workload_file), str(out_file)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"TRL's run failed:\n{result.stderr[-3000:]}")
    report = json.loads(out_file.read_text())
    steps = []
    for stamps in report["iterations"][1:]:
        seconds = stamps["step_end"] - stamps["previous_step_end"]
        steps.append({"samples_per_second": report["rows"] / seconds, "step_seconds": seconds,
                      "generation": stamps["generation_end"] - stamps["generation_start"],
                      "rollout_rest": stamps["last_reward_end"] - stamps["generation_end"],
                      "optimisation": stamps["step_end"] - stamps["last_reward_end"],
                      "peak_memory_gb": report["peak_memory_gb"]})
    return steps


def run_rayrlhf(args, overrides: List[str], run_dir: Path) -> List[Dict[str, float]]:
    """The counted PPO steps of one rayrlhf run: samples/s, the phases, and the actors' peak memory."""
    steps = run_variant(overrides, run_dir)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peaks = {key: value for r in rounds if r.get("phase") == "round" for key, value in r.items()
             if key.startswith("peak_memory_gb_")}
    return [{"samples_per_second": args.prompts / sum(step[p] for p in PHASES), "step_seconds": sum(step[p] for p in PHASES),
             **{p.removesuffix("_seconds"): step[p] for p in PHASES},
             "peak_memory_gb": max(peaks.values()), "peak_memory_gb_actors": sum(peaks.values())} for step in steps]


def summary(steps: List[Dict[str, float]], phases) -> Dict[str, float]:
    rates = [s["samples_per_second"] for s in steps]
    result = {"samples_per_second": statistics.median(rates), "min": min(rates), "max": max(rates)}
    result.update({p: statistics.median(s[p] for s in steps) for p in phases})
    result["peak_memory_gb"] = max(s["peak_memory_gb"] for s in steps)
    if "peak_memory_gb_actors" in steps[0]:
        result["peak_memory_gb_actors"] = max(s["peak_memory_gb_actors"] for s in steps)
    return result


def markdown(args, variants: Dict[str, Dict[str, float]], trl: Dict[str, float], wall: float, command: str) -> str:
    phases_trl = ", ".join(f"{p} {trl[p]:.3f}" for p in TRL_PHASES)
    lines = [
        f"# PPO step: rayrlhf vs TRL {TRL_VERSION}", "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}; {args.repeats} runs of each, alternating, {args.steps} counted steps per run "
        f"({wall:.0f} s in all). Workload: {args.prompts} TL;DR prompts x {args.prompt_tokens} tokens, {args.new_tokens} "
        f"new tokens at temperature {args.temperature}, {args.layers} layers x {args.width} wide Llama-shaped policy, "
        f"value and reward models, 1 PPO epoch of {args.mini_batches} mini-batches, lr {args.lr}, kl {args.kl_coef}, "
        f"float32 unless a variant says otherwise; rayrlhf engine `{args.engine}`.", "",
        "| | samples/s median (range) | vs TRL | phases, median s | peak memory GB |", "|---|---|---|---|---|",
        f"| TRL {TRL_VERSION} PPOTrainer | {trl['samples_per_second']:.2f} ({trl['min']:.2f}-{trl['max']:.2f}) | 1.00x | "
        f"{phases_trl} | {trl['peak_memory_gb']:.2f} (one process) |"]
    for name, result in variants.items():
        ratio = result["samples_per_second"] / trl["samples_per_second"]
        phases = ", ".join(f"{p.removesuffix('_seconds')} {result[p.removesuffix('_seconds')]:.3f}" for p in PHASES)
        lines.append(f"| {name} | {result['samples_per_second']:.2f} ({result['min']:.2f}-{result['max']:.2f}) | {ratio:.2f}x | "
                     f"{phases} | {result['peak_memory_gb']:.2f} largest actor, {result['peak_memory_gb_actors']:.2f} all actors |")
    lines += ["", "Variants (overrides on top of the workload): "
              + "; ".join(f"{name}: `{extra or '-'}`" for name, extra in rayrlhf_variants(args).items()) + "."]
    return "\n".join(lines)


def rayrlhf_variants(args) -> Dict[str, str]:
    """The rayrlhf configurations measured: the plain one and each --variant, as name -> space-separated overrides."""
    return {"rayrlhf": "", **dict(v.split("=", 1) for v in args.variant)}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.tokenizer = args.tokenizer or str(ROOT.parent / "shared" / "tokenizers" / "gpt2")
    python = trl_python(Path(args.trl_venv))
    overrides = workload(args) + [f"ppo.kl_coef={args.kl_coef}", f"ppo.policy_lr={args.lr}",
                                  f"ppo.critic_lr={args.lr}", f"ppo.mini_batches={args.mini_batches}",
                                  f"rollout.temperature={args.temperature}", *args.rayrlhf_set]
    shared = {"prompt_ids": prompt_ids(args, args.tokenizer), "tokenizer": args.tokenizer, "width": args.width,
              "layers": args.layers, "max_positions": 512, "prompts": args.prompts, "steps": args.steps,
              "mini_batches": args.mini_batches, "epochs": 1, "lr": args.lr, "new_tokens": args.new_tokens,
              "temperature": args.temperature, "kl_coef": args.kl_coef, "seed": 0}
    variants = rayrlhf_variants(args)
    steps: Dict[str, list] = {"trl": [], **{name: [] for name in variants}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        workload_file = Path(folder) / "workload.json"
        workload_file.write_text(json.dumps(shared))
        for repeat in range(args.repeats):
            steps["trl"] += run_trl(python, workload_file, Path(folder) / f"trl_{repeat}.json")
            for index, (name, extra) in enumerate(variants.items()):
                steps[name] += run_rayrlhf(args, overrides + extra.split(), Path(folder) / f"rayrlhf_{repeat}_{index}")
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{name} {s[-1]['samples_per_second']:.2f}"
                  for name, s in steps.items()) + " samples/s (last step)", file=sys.stderr, flush=True)
    command = " ".join([".venv/bin/python", "benchmarks/ppo_vs_trl.py", *(sys.argv[1:] if argv is None else argv)])
    phases = [p.removesuffix("_seconds") for p in PHASES]
    text = markdown(args, {name: summary(steps[name], phases) for name in variants}, summary(steps["trl"], TRL_PHASES),
                    time.perf_counter() - started, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
