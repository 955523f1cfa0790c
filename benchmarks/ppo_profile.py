"""Where the PPO learner's step goes: the issue-20 workload's PPO phase in this process (one rank, no Ray), timed
pass by pass, and torch.profiler's top operators.

    .venv/bin/python benchmarks/ppo_profile.py [--steps 5] [--rows 16] [--prompt-tokens 32] [--new-tokens 32]
        [--layers 4] [--width 256] [--set ppo.FIELD=VALUE ...] [--profile]

The models are benchmarks/ppo_throughput.py's (Llama-shaped, GPT-2 tokenizer, random weights); prompts and
responses are random tokens of full length (the rollout's content does not change the cost). One warm-up step,
then `--steps` timed steps of `experience()` + `train()`; each pass's seconds per step: the policy's, the
reference's and the critic's no-gradient passes, and the policy's and the critic's updates (forward, backward and
optimizer step). `--set` changes PPOConfig fields (e.g. `--set forward_micro_batch_size=4`).
"""
import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayrlhf.config import ModelSpec, PPOConfig  # noqa: E402
from rayrlhf.data.rollouts import Rollout  # noqa: E402
from rayrlhf.models.build import build_causal_lm, build_reward_model, load_tokenizer  # noqa: E402
from rayrlhf.training import ppo_learner  # noqa: E402
from rayrlhf.training.distributed import init_distributed  # noqa: E402

SECONDS = defaultdict(float)


@contextmanager
def timed(name: str):
    started = time.perf_counter()
    yield
    SECONDS[name] += time.perf_counter() - started


def instrument(learner: ppo_learner.PPOLearner) -> None:
    """Time the learner's passes by wrapping what it calls: the no-gradient passes by the model they run, and each
    engine's accumulated step (forward, backward, optimizer step)."""
    forward = ppo_learner.forward_in_micro_batches
    passes = itertools.cycle(["policy", "reference", "critic"])  # experience()'s order (GIL's extra pass: off here)

    def timed_forward(function, batch, size):
        with timed(f"experience: {next(passes)} pass"):
            return forward(function, batch, size)

    ppo_learner.forward_in_micro_batches = timed_forward
    accumulated = learner._accumulated_step

    def timed_step(name, *args, **kwargs):
        with timed(f"train: {name} update"):
            return accumulated(name, *args, **kwargs)

    learner._accumulated_step = timed_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--set", dest="fields", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    args = parser.parse_args()

    init_distributed("cpu")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tiny = {"hidden_size": args.width, "num_layers": args.layers, "num_heads": args.width // 64,
            "intermediate_size": 4 * args.width}
    spec = ModelSpec(source="tiny", tokenizer=str(ROOT.parent / "shared" / "tokenizers" / "gpt2"), tiny=tiny)
    tokenizer = load_tokenizer(spec)
    fields = dict(field.split("=", 1) for field in args.fields)
    settings = PPOConfig(**{"epochs": 1, "mini_batches": 2, "policy_lr": 3e-6, "critic_lr": 3e-6, **fields})
    learner = ppo_learner.PPOLearner(build_causal_lm(spec, tokenizer, seed=0), build_reward_model(spec, tokenizer, seed=1),
                                     settings, micro_batch_size=args.rows // 2, pad_id=tokenizer.pad_token_id, device="cpu")
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, len(tokenizer) - 1, (args.rows, args.prompt_tokens), generator=generator).tolist()
    responses = torch.randint(10, len(tokenizer) - 1, (args.rows, args.new_tokens), generator=generator).tolist()
    rollout = Rollout([""] * args.rows, prompts, responses, [""] * args.rows, [[0.0] * args.new_tokens] * args.rows, 1)
    scores = torch.randn(args.rows, generator=generator)

    def step():
        with timed("experience (all)"):
            experience = learner.experience(rollout, scores, 0.05)
        with timed("train (all)"):
            learner.train(experience, seed=0)

    step()
    SECONDS.clear()
    instrument(learner)
    totals = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        totals.append(time.perf_counter() - started)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rows} rows x ({args.prompt_tokens} + {args.new_tokens}) tokens, {args.layers} layers x {args.width}; "
          f"settings {fields or 'defaults'}; {args.steps} steps after a warm-up\n")
    print(f"step: median {statistics.median(totals):.3f} s (range {min(totals):.3f}-{max(totals):.3f})\n")
    print("| part | s per step |\n|---|---|")
    for name, seconds in sorted(SECONDS.items()):
        print(f"| {name} | {seconds / args.steps:.3f} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
        print("\n" + profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
