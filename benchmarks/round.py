"""Where one round's time goes: each stage measured through Ray (as the product runs) and in-process (the
same classes called directly), so the difference is what Ray costs.

    .venv/bin/python benchmarks/round.py [key=value ...]      (overrides of conf/tiny.yaml, e.g. rounds=2)

Through Ray: load_config("conf/tiny.yaml", overrides), a local Ray, start_actors, Pipeline(...).start(), then
each round replays Pipeline.round / ppo_step / WeightSync.push / checkpoint call by call (the same actor
methods, the same seeds from rayrlhf/seeds.py), timing every call. In-process: RolloutWorker, RewardLearner and
PPOTrainer instantiated in this process (one rank each, sharing this process's one torch.distributed group),
started as Pipeline.start does (initial RM, critic from the RM, SFT, weight sync), then the same round.
The two run interleaved round by round, so machine noise hits both alike. One warm-up round is not
counted; `rounds` rounds are (their mean is reported). Ray overhead = Ray time - in-process time.
The responses and scores of the two are compared at the end: the work must be identical.
"""
import copy
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayrlhf.actors.ppo_trainer import PPOTrainer  # noqa: E402
from rayrlhf.actors.reward_learner import RewardLearner  # noqa: E402
from rayrlhf.actors.rollout_worker import RolloutWorker  # noqa: E402
from rayrlhf.algos.rewards import gold_pair_accuracy, reward_difference_statistics  # noqa: E402
from rayrlhf.checkpoints import begin_checkpoint, checkpoint_path, commit_checkpoint  # noqa: E402
from rayrlhf.config import load_config  # noqa: E402
from rayrlhf.data.rollouts import Rollout  # noqa: E402
from rayrlhf.data.synthetic import SyntheticPreferenceTask  # noqa: E402
from rayrlhf.pipeline import Pipeline, _groups, load_prompt_sets, start_actors  # noqa: E402
from rayrlhf.seeds import Stream, loop_seed, worker_seed  # noqa: E402
from rayrlhf.training.distributed import exit_distributed_process, init_distributed  # noqa: E402

STAGES = ["generation: meta data", "RM diagnostics + evaluation", "RM training", "generation: PPO rollouts",
          "scoring", "PPO update", "weight sync", "driver: gold reward, KL", "checkpoint"]


class ThroughRay:
    """The product's actors and Pipeline: every call crosses Ray as in Pipeline.round."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.kl, self.run_dir = pipeline, pipeline.kl, pipeline.run_dir
        self.generate, self.sync_weights, self.checkpoint = pipeline.generate, pipeline.weight_sync.push, pipeline.checkpoint
        # the groups' methods have the actors' names and answers: the stages below call either side alike
        self.learner, self.trainer = pipeline.actors.reward_learner, pipeline.actors.ppo_trainer


class InProcess:
    """The same classes in this process, one rank each, started as Pipeline.start starts a fresh run."""

    def __init__(self, config, prompts, kl, run_dir: Path):
        resources = config.resources
        if resources.reward_learner_ranks != 1 or resources.ppo_ranks != 1:
            raise SystemExit("in-process needs resources.reward_learner_ranks=1 and resources.ppo_ranks=1")
        self.config, self.kl, self.run_dir, self.version = config, kl, run_dir, 0
        init_distributed("cpu")  # the one group of this process; both join_process_group calls find it
        self.workers = [RolloutWorker(config, i) for i in range(resources.rollout_workers)]
        self.learner, self.trainer = RewardLearner(config, 0, 1), PPOTrainer(config, 0, 1)
        self.learner.join_process_group("", 0)  # returns from init_distributed at once, then builds the RM engine
        self.trainer.join_process_group("", 0)
        self.learner.train_initial()
        self.learner.evaluate()
        self.trainer.build(self.learner.critic_weights() if config.ppo.critic_from_reward_model else None, None)
        if config.sft.steps:
            rng = random.Random(loop_seed(config.seed, Stream.SFT_BATCHES))
            for _ in range(config.sft.steps):
                batch = rng.sample(prompts.sft, config.sft.batch_size)
                self.trainer.sft_step([p for p, _ in batch], [r for _, r in batch])
            self.trainer.end_sft()
        self.checkpoint(0)
        self.sync_weights()

    def generate(self, prompts, n, seed):  # Pipeline.generate's split, one worker after another
        share = -(-len(prompts) // len(self.workers))
        parts = [prompts[i * share : (i + 1) * share] for i in range(len(self.workers))]
        temperature = self.config.rollout.temperature
        return Rollout.concatenate([worker.generate(part, n, temperature, worker_seed(seed, i))
                                    for i, (worker, part) in enumerate(zip(self.workers, parts)) if part])

    def sync_weights(self):
        self.version += 1
        weights = self.trainer.policy_weights()
        for worker in self.workers:
            worker.load_weights(weights, self.version)

    def checkpoint(self, round_index):
        staging = begin_checkpoint(self.run_dir, round_index)
        self.learner.save_checkpoint(str(staging))
        self.trainer.save_checkpoint(str(staging))
        commit_checkpoint(staging, {"round": round_index}, self.config.keep_checkpoints)


def diagnostics(side, groups, task) -> None:
    """Pipeline.group_diagnostics."""
    rewards = torch.tensor(side.learner.group_scores(groups))
    reward_difference_statistics(rewards)
    if task is not None:
        gold = torch.tensor([[task.gold_reward(p, r) for r in responses] for p, responses in groups])
        gold_pair_accuracy(rewards, gold)


def one_round(side, config, prompts, task, r: int, times) -> list:
    """Pipeline.round(r) plus its checkpoint, stage by stage; returns what was generated and scored."""
    def timed(stage, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        times[stage] += time.perf_counter() - started
        return result

    reward, ppo, seed, work = config.reward, config.ppo, config.seed, []
    round_started = time.perf_counter()
    meta_prompts = random.Random(loop_seed(seed, Stream.META_PROMPTS, r)).sample(
        prompts.meta, min(reward.meta_prompts_per_round, len(prompts.meta)))
    meta = timed(STAGES[0], side.generate, meta_prompts, reward.samples_per_prompt, loop_seed(seed, Stream.META_SAMPLING, r))
    groups = _groups(meta)
    timed(STAGES[1], diagnostics, side, groups, task)
    if reward.reset_each_round:
        timed(STAGES[2], side.learner.load_checkpoint, str(checkpoint_path(side.run_dir, 0)))
    use_policy_meta = reward.method == "metarm" and reward.meta_source == "policy"
    timed(STAGES[2], side.learner.train_round, r, groups if use_policy_meta else None)
    timed(STAGES[1], side.learner.evaluate)
    timed(STAGES[1], diagnostics, side, groups, task)
    for step in range(1, ppo.steps_per_round + 1):
        step_prompts = random.Random(loop_seed(seed, Stream.PPO_PROMPTS, r, step)).sample(
            prompts.train, min(ppo.rollout_batch_size, len(prompts.train)))
        rollout = timed(STAGES[3], side.generate, step_prompts, config.rollout.n_per_prompt, loop_seed(seed, Stream.PPO_SAMPLING, r, step))
        scores = timed(STAGES[4], side.learner.score, rollout.prompt_texts, rollout.response_texts)
        metrics = timed(STAGES[5], side.trainer.ppo_step, rollout, scores, side.kl.value, loop_seed(seed, Stream.PPO_UPDATE, r, step), r)
        timed(STAGES[6], side.sync_weights)
        started = time.perf_counter()
        side.kl.update(metrics["kl_per_sequence"], len(rollout))
        if task is not None:
            sum(map(task.gold_reward, rollout.prompt_texts, rollout.response_texts))
        times[STAGES[7]] += time.perf_counter() - started
        work.append((meta.response_ids, rollout.response_ids, scores))
    timed(STAGES[8], side.checkpoint, r)
    times["round (wall)"] += time.perf_counter() - round_started
    return work


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    scratch = Path(tempfile.mkdtemp(prefix="round-bench-"))
    config = load_config("conf/tiny.yaml", sys.argv[1:] + [f"run_dir={scratch / 'ray'}"])
    prompts = load_prompt_sets(config)
    task = SyntheticPreferenceTask(config.data.synthetic, config.seed) if config.data.preference.format == "synthetic" else None
    load_before = os.getloadavg()

    started = time.perf_counter()
    ray.init(include_dashboard=False)
    pipeline = Pipeline(config, start_actors(config), prompts)
    pipeline.start()
    ray_start = time.perf_counter() - started
    started = time.perf_counter()
    local = InProcess(config, prompts, copy.deepcopy(pipeline.kl), scratch / "local")
    local_start = time.perf_counter() - started

    sides = {"ray": ThroughRay(pipeline), "local": local}
    times = {name: defaultdict(float) for name in sides}
    work = {name: [] for name in sides}
    for r in range(1, config.rounds + 2):  # round 1 warms up
        for name, side in sides.items():
            work[name] += one_round(side, config, prompts, task, r, times[name] if r > 1 else defaultdict(float))
    started = time.perf_counter()  # a cross-check: one more round by the product's own Pipeline.round
    product = pipeline.round(config.rounds + 2)
    product["round_seconds"] = time.perf_counter() - started
    pipeline.close()
    ray.shutdown()

    n = config.rounds
    total = times["ray"]["round (wall)"] / n
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} thread per process, "
          f"as prepare_actor_process sets), ray {ray.__version__}, python {platform.python_version()}")
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    ppo, reward = config.ppo, config.reward
    print(f"config: conf/tiny.yaml {' '.join(sys.argv[1:])}".rstrip() + f"; per round: meta data {reward.meta_prompts_per_round} "
          f"prompts x {reward.samples_per_prompt}, RM training <= {reward.max_steps} steps ({reward.method}), {ppo.steps_per_round} PPO "
          f"steps of {ppo.rollout_batch_size} prompts x {config.rollout.n_per_prompt} ({ppo.epochs} epochs x {ppo.mini_batches} "
          f"mini-batches); {config.resources.rollout_workers} rollout worker(s); mean of {n} rounds after 1 warm-up round")
    print(f"start (actors + Pipeline.start / in-process equivalent): {ray_start:.1f} s / {local_start:.1f} s")
    print(f"identical work (responses, scores) in both: {'yes' if work['ray'] == work['local'] else 'NO'}")
    print("\n| stage | s/round through Ray | s/round in-process | Ray overhead (s) | Ray / in-process | share of the round (%) |")
    print("|---|---|---|---|---|---|")
    rows = STAGES + ["other (driver loop)", "round (wall)"]
    for name in sides:
        times[name]["other (driver loop)"] = times[name]["round (wall)"] - sum(times[name][s] for s in STAGES)
    for stage in rows:
        a, b = times["ray"][stage] / n, times["local"][stage] / n
        ratio = f"{a / b:.2f}" if b > 1e-4 else "-"
        print(f"| {stage} | {a:.3f} | {b:.3f} | {a - b:+.3f} | {ratio} | {100 * a / total:.1f} |")
    steps = ppo.steps_per_round
    print(f"\nPipeline.round's own timings of one more round (r{config.rounds + 2}, once, s): meta sampling "
          f"{product['meta_sampling_seconds']:.3f}, RM training {product['rm_training_seconds']:.3f}, generation "
          f"{steps * product['generation_seconds']:.3f}, scoring {steps * product['scoring_seconds']:.3f}, PPO update "
          f"{steps * product['ppo_seconds']:.3f}, weight sync {steps * product['weight_sync_seconds']:.3f}; "
          f"round {product['round_seconds']:.3f} (no checkpoint)")
    exit_distributed_process()


if __name__ == "__main__":
    main()
