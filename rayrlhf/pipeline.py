"""The single controller: it owns the order of events and nothing else.

    start     SFT warm-up (optional), initial vanilla RM training, checkpoint round 0
    round r   1. meta data: the current policy answers meta_prompts_per_round prompts k times each
              2. RM training on the preference pairs: MetaRM with that meta data (or vanilla)
              3. PPO steps: rollout, score with the RM, update policy and critic, sync weights to the workers
              4. evaluation: RM held-out accuracy, reward-difference variance on the policy's samples,
                 gold reward and the RM's accuracy on gold-labelled pairs (synthetic task)
              5. checkpoint (renamed into place)

Every stage's seed is derived from (config.seed, round, step), so a run is reproducible and a resumed run
replays exactly what the uninterrupted one would have done.
"""
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import ray
from ray.util.placement_group import PlacementGroup
from tqdm import tqdm

from rayrlhf.actors.placement import RankGroup, reserve, start_actor
from rayrlhf.actors.ppo_trainer import PPOTrainer
from rayrlhf.actors.reward_learner import RewardLearner
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.algos.kl import AdaptiveKLController, FixedKLController
from rayrlhf.algos.rewards import RunningRewardMoments, gold_pair_accuracy, normalize_rewards, reward_difference_statistics
from rayrlhf.checkpoints import begin_checkpoint, checkpoint_path, commit_checkpoint, latest_checkpoint, read_state
from rayrlhf.config import RunConfig
from rayrlhf.logs import actor_environment
from rayrlhf.data.rollouts import Rollout
from rayrlhf.data.sources import load_preference_pairs, split_by_prompt
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.evaluation.held_out import HeldOutJudging
from rayrlhf.evaluation.judging import build_judge
from rayrlhf.metrics import MetricsLogger

import torch


logger = logging.getLogger(__name__)
WORKER_RESTART_TIMEOUT_S = 600  # a restarted worker rebuilds its engine (vLLM: tens of seconds on a CPU)


def logprob_mismatch_warning(mismatch: float, threshold: float, step: int) -> Optional[str]:
    """The warning for a PPO step whose engine and trainer log-probs differ by more than `threshold`, else None."""
    if mismatch <= threshold:
        return None
    return (f"PPO step {step}: the rollout engine's log-probs differ from the trainer's by {mismatch:.3g} per token "
            f"on average (rollout.logprob_mismatch_warning={threshold:g}); the engine may hold stale weights or "
            "compute in another dtype, and PPO's importance ratios start off 1")


@dataclass
class PromptSets:
    """What the driver samples from: training prompts, meta-data prompts, and SFT (prompt, response) pairs."""

    train: List[str]
    meta: List[str]
    sft: List[Tuple[str, str]]
    held_out: List[str]


def load_prompt_sets(config: RunConfig) -> PromptSets:
    """Read the data once in the driver (errors surface here, before any actor starts)."""
    data = config.data
    pairs = load_preference_pairs(data.preference, data.synthetic, config.seed).pairs
    train, evaluation = split_by_prompt(pairs, data.eval_fraction, config.seed)
    train_prompts = list(dict.fromkeys(train["prompt"]))
    meta = train_prompts
    if data.meta_prompts is not None:
        meta = list(dict.fromkeys(load_preference_pairs(data.meta_prompts, data.synthetic, config.seed).pairs["prompt"]))
    held_out = list(dict.fromkeys(evaluation["prompt"]))[: config.evaluation.prompts]
    return PromptSets(train_prompts, meta, list(zip(train["prompt"], train["chosen"])), held_out)


def stage_seed(seed: int, round_index: int, step: int, salt: int = 0) -> int:
    return ((seed * 1_000 + round_index) * 10_000 + step) * 10 + salt


def worker_seed(stage: int, worker_index: int) -> int:
    """Each rollout worker's generator seed within a stage, apart from every other stage's seed."""
    return stage * 1009 + worker_index


@dataclass
class Actors:
    rollout_workers: List
    reward_learner: RankGroup
    ppo_trainer: RankGroup
    placement: PlacementGroup
    owns_placement: bool = True

    def stop(self) -> None:
        """Kill every actor and free the reservation (on a shared cluster nothing must linger)."""
        ray.wait([worker.shutdown.remote() for worker in self.rollout_workers], num_returns=len(self.rollout_workers), timeout=60)
        for actor in self.rollout_workers + self.reward_learner.actors + self.ppo_trainer.actors:
            ray.kill(actor)
        if self.owns_placement:
            ray.util.remove_placement_group(self.placement)


def start_actors(config: RunConfig, given: Optional[PlacementGroup] = None, first_bundle: int = 0) -> Actors:
    """Every actor in one placement group (its own, or bundles first_bundle... of `given`, e.g. a Tune
    trial's), then the two rank groups form their process groups."""
    resources, environment = config.resources, actor_environment(config.log_level)
    group = given or reserve(resources)
    slots = iter(range(first_bundle, 10**6))
    workers = [start_actor(RolloutWorker, group, next(slots), resources, config, i,
                           max_restarts=resources.rollout_worker_restarts, environment=environment)
               for i in range(resources.rollout_workers)]
    learner = RankGroup([start_actor(RewardLearner, group, next(slots), resources, config, rank, resources.reward_learner_ranks,
                                     environment=environment) for rank in range(resources.reward_learner_ranks)])
    trainer = RankGroup([start_actor(PPOTrainer, group, next(slots), resources, config, rank, resources.ppo_ranks,
                                     environment=environment) for rank in range(resources.ppo_ranks)])
    learner.form_process_group()
    trainer.form_process_group()
    return Actors(workers, learner, trainer, group, owns_placement=given is None)


class Pipeline:
    def __init__(self, config: RunConfig, actors: Actors, prompts: PromptSets):
        self.config, self.actors, self.prompts = config, actors, prompts
        self.run_dir = Path(config.run_dir)
        self.metrics = MetricsLogger(self.run_dir)
        self.task = SyntheticPreferenceTask(config.data.synthetic, config.seed) if config.data.preference.format == "synthetic" else None
        ppo = config.ppo
        self.kl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl else FixedKLController(ppo.kl_coef)
        self.reward_moments = RunningRewardMoments()
        self.history: List[Dict[str, float]] = []
        self.global_step = 0
        self.weights_version = 0
        self.weight_plan = None  # bucket layout of the broadcast weight sync, once its group is formed
        self.worker_restarts = 0
        self.last_checkpoint: Optional[Path] = None
        self.held_out = self._held_out_judging()

    def _held_out_judging(self) -> Optional[HeldOutJudging]:
        evaluation = self.config.evaluation
        if not evaluation.every_rounds:
            return None
        return HeldOutJudging(build_judge(self.config), self.prompts.held_out, evaluation.samples_per_prompt,
                              evaluation.tie_margin, stage_seed(self.config.seed, 0, 0, 7), self.run_dir)

    def sample_texts(self, prompts: List[str], n: int, seed: int) -> List[str]:
        """The current policy's response texts (n per prompt, prompt-major) from the rollout workers."""
        return self.generate(prompts, n, seed, 0).response_texts

    # ---- start ---------------------------------------------------------------------------------
    def start(self) -> int:
        """Fresh start (SFT, initial RM, round-0 checkpoint) or resume; returns the last finished round."""
        learner, trainer = self.actors.reward_learner, self.actors.ppo_trainer
        checkpoint = latest_checkpoint(self.run_dir) if self.config.resume else None
        if checkpoint is not None:
            state = read_state(checkpoint)
            trainer.call("build", None, str(self.run_dir / "reference"))
            trainer.call("load_checkpoint", str(checkpoint))
            learner.call("load_checkpoint", str(checkpoint))
            self.kl.value, self.history, self.global_step = state["kl_coefficient"], state["history"], state["global_step"]
            self.metrics.rewind(state["round"], state["global_step"])
            self.last_checkpoint = checkpoint
            print(f"resumed from {checkpoint} (round {state['round']} done)", file=sys.stderr)
            self.sync_weights()
            if self.held_out is not None and not self.held_out.load_initial():
                self.held_out = None
            return state["round"]
        started = time.perf_counter()
        initial = learner.call_first("train_initial")
        initial.update({f"initial_{k}": v for k, v in learner.call_first("evaluate").items()})
        critic_weights = learner.call_refs("critic_weights")[0] if self.config.ppo.critic_from_reward_model else None
        trainer.call("build", critic_weights, None)
        initial.update(self.supervised_warm_up())
        trainer.call_first("save_policy", str(self.run_dir / "reference"), True)
        initial["start_seconds"] = time.perf_counter() - started
        self.metrics.log("start", 0, initial)
        self.checkpoint(0)
        self.sync_weights()
        if self.held_out is not None:
            self.held_out.record_initial(self.sample_texts)
        return 0

    def supervised_warm_up(self) -> Dict[str, float]:
        sft, trainer = self.config.sft, self.actors.ppo_trainer
        if not sft.steps:
            return {}
        rng = random.Random(stage_seed(self.config.seed, 0, 0, 1))
        losses = []
        # mininterval: where stderr is a file or a pipe, each redraw is a line of its own
        for step in tqdm(range(sft.steps), desc="SFT warm-up", file=sys.stderr, leave=False, mininterval=1.0):
            batch = rng.sample(self.prompts.sft, sft.batch_size)
            losses.append(trainer.call_first("sft_step", [p for p, _ in batch], [r for _, r in batch])["sft_loss"])
            self.metrics.log("sft", step + 1, {"sft_loss": losses[-1]})
        trainer.call("end_sft")
        return {"sft_first_loss": losses[0], "sft_last_loss": losses[-1]}

    # ---- the rounds ------------------------------------------------------------------------------
    def run(self, on_round: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
        """Every round left; `on_round(summary)` after each round's checkpoint (a Tune trial reports there)."""
        done = self.start()
        for round_index in range(done + 1, self.config.rounds + 1):
            started = time.perf_counter()
            summary = self.round(round_index)
            summary["round_seconds"] = time.perf_counter() - started
            self.history.append(summary)
            self.metrics.log("round", round_index, summary)
            self.checkpoint(round_index)
            if on_round:
                on_round(summary)
        self.save_final_models()
        return self.history

    def round(self, round_index: int) -> Dict[str, float]:
        config, learner = self.config, self.actors.reward_learner
        summary: Dict[str, float] = {"round": round_index}
        ppo_steps = config.ppo.steps_per_round
        with tqdm(total=ppo_steps + 2, desc=f"round {round_index}/{config.rounds}", file=sys.stderr, leave=False) as bar:
            bar.set_postfix_str("sampling meta data")
            started = time.perf_counter()
            rng = random.Random(stage_seed(config.seed, round_index, 0, 2))
            meta_prompts = rng.sample(self.prompts.meta, min(config.reward.meta_prompts_per_round, len(self.prompts.meta)))
            meta = self.generate(meta_prompts, config.reward.samples_per_prompt, stage_seed(config.seed, round_index, 0, 3), round_index)
            groups = _groups(meta)
            summary["meta_sampling_seconds"] = time.perf_counter() - started
            diagnostics, rewards_before = self.group_diagnostics(groups)
            summary.update(_prefixed("before_rm_", diagnostics))
            bar.update()

            bar.set_postfix_str("training the reward model")
            started = time.perf_counter()
            if config.reward.reset_each_round:
                learner.call("load_checkpoint", str(checkpoint_path(self.run_dir, 0)))
            use_policy_meta = config.reward.method == "metarm" and config.reward.meta_source == "policy"
            summary.update(learner.call_first("train_round", round_index, groups if use_policy_meta else None))
            summary["rm_training_seconds"] = time.perf_counter() - started
            summary.update(learner.call_first("evaluate"))
            diagnostics, rewards = self.group_diagnostics(groups)
            summary.update(diagnostics)
            self.save_samples(round_index, groups, rewards_before, rewards)
            bar.update()

            step_metrics = []
            self.reward_moments.reset()  # the RM just changed: its scores have a new scale
            for step in range(1, ppo_steps + 1):
                bar.set_postfix_str(f"PPO step {step}/{ppo_steps}")
                step_metrics.append(self.ppo_step(round_index, step))
                bar.update()
        summary.update({name: sum(m[name] for m in step_metrics) / len(step_metrics) for name in step_metrics[0]})
        if self.held_out is not None and round_index % config.evaluation.every_rounds == 0:
            started = time.perf_counter()
            summary.update(self.held_out.judge_policy(self.sample_texts))
            summary["judging_seconds"] = time.perf_counter() - started
        summary["kl_coefficient"] = self.kl.value
        summary.update(self.peak_memory())
        return summary

    def peak_memory(self) -> Dict[str, float]:
        """Each role's peak process memory so far (GiB; the largest of its actors): RSS on CPU, allocated on GPU."""
        actors = self.actors
        roles = {"rollout": actors.rollout_workers, "reward": actors.reward_learner.actors, "ppo": actors.ppo_trainer.actors}
        peaks = {f"peak_memory_gb_{role}": max(ray.get([actor.peak_memory_gb.remote() for actor in members]))
                 for role, members in roles.items()}
        return {**peaks, "peak_memory_gb": max(peaks.values())}

    def generate(self, prompts: List[str], n: int, seed: int, round_index: int) -> Rollout:
        """n samples per prompt, the prompts split contiguously over the rollout workers. A worker whose
        process died is restarted by Ray; it then gets the current weights and redoes its part, with the
        same seed, so the batch is the one it would have been."""
        workers = self.actors.rollout_workers
        share = -(-len(prompts) // len(workers))
        parts = [(i, w, prompts[i * share : (i + 1) * share]) for i, w in enumerate(workers)]
        temperature = self.config.rollout.temperature
        futures = [(i, w, part, w.generate.remote(part, n, temperature, worker_seed(seed, i), round_index)) for i, w, part in parts if part]
        results = []
        for i, worker, part, future in futures:
            try:
                results.append(ray.get(future))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                self.worker_restarts += 1
                if self.worker_restarts > self.config.resources.rollout_worker_restarts:
                    raise
                logger.warning("rollout worker %d died (%s); restarted, re-synced, regenerating its part", i, type(error).__name__)
                self.resync_restarted_worker(worker)
                results.append(ray.get(worker.generate.remote(part, n, temperature, worker_seed(seed, i), round_index)))
        return Rollout.concatenate(results)

    def resync_restarted_worker(self, worker) -> None:
        """The current policy into a restarted worker (through the object store, whatever the transport: a
        broadcast group lost a member and is formed again at the next sync)."""
        deadline = time.monotonic() + WORKER_RESTART_TIMEOUT_S
        while True:  # calls fail with ActorUnavailableError until Ray has restarted it
            try:
                ray.get(worker.ready.remote())
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        buckets = self.actors.ppo_trainer.actors[0].policy_to_object_store.remote(int(self.config.rollout.weight_sync_bucket_mb * 2**20))
        ray.get(worker.load_weight_buckets.remote(buckets, self.weights_version))
        self.weight_plan = None

    def save_samples(self, round_index: int, groups, rewards_before: torch.Tensor, rewards: torch.Tensor) -> None:
        """The round's meta data as JSONL: prompt, responses, the RM's scores before and after the round's training
        (`rewards_before_rm`, `rewards`) and, on the synthetic task, `gold`. To read, to draw (python -m rayrlhf.eval),
        or to reuse as fixed meta data."""
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        with open(folder / f"round_{round_index:04d}_meta.jsonl", "w", encoding="utf-8") as handle:
            for (prompt, responses), before, after in zip(groups, rewards_before.tolist(), rewards.tolist()):
                record = {"prompt": prompt, "responses": responses, "rewards_before_rm": before, "rewards": after}
                if self.task is not None:
                    record["gold"] = [self.task.gold_reward(prompt, response) for response in responses]
                handle.write(json.dumps(record) + "\n")

    def group_diagnostics(self, groups) -> Tuple[Dict[str, float], torch.Tensor]:
        """Reward-difference statistics of the RM on the policy's k samples per prompt, and (synthetic task)
        gold reward and the RM's accuracy on gold-labelled pairs of those samples; and the (P, k) scores."""
        rewards = torch.tensor(self.actors.reward_learner.call_first("group_scores", groups))
        results = reward_difference_statistics(rewards)
        if self.task is not None:
            gold = torch.tensor([[self.task.gold_reward(p, r) for r in responses] for p, responses in groups])
            results.update(gold_pair_accuracy(rewards, gold))
            results["policy_gold_reward"] = gold.mean().item()
        return results, rewards

    def ppo_step(self, round_index: int, step: int) -> Dict[str, float]:
        config = self.config
        self.global_step += 1
        timings: Dict[str, float] = {}
        started = time.perf_counter()
        rng = random.Random(stage_seed(config.seed, round_index, step, 4))
        prompts = rng.sample(self.prompts.train, min(config.ppo.rollout_batch_size, len(self.prompts.train)))
        rollout = self.generate(prompts, config.rollout.n_per_prompt, stage_seed(config.seed, round_index, step, 5), round_index)
        timings["generation_seconds"] = time.perf_counter() - started
        timings["generation_tokens_per_second"] = rollout.num_tokens / timings["generation_seconds"]

        started = time.perf_counter()
        scores = self.actors.reward_learner.call_first("score", rollout.prompt_texts, rollout.response_texts)
        timings["scoring_seconds"] = time.perf_counter() - started

        started = time.perf_counter()
        kl_coefficient = self.kl.value
        metrics = self.actors.ppo_trainer.call_first("ppo_step", rollout, self.ppo_rewards(scores), kl_coefficient,
                                                     stage_seed(config.seed, round_index, step, 6), round_index)
        timings["ppo_seconds"] = time.perf_counter() - started
        timings["ppo_tokens_per_second"] = rollout.num_tokens * config.ppo.epochs / timings["ppo_seconds"]
        self.kl.update(metrics["kl_per_sequence"], len(rollout))

        started = time.perf_counter()
        self.sync_weights()
        timings["weight_sync_seconds"] = time.perf_counter() - started

        scores_tensor = torch.tensor(scores)
        metrics.update(reward_mean=scores_tensor.mean().item(), reward_std=scores_tensor.std(unbiased=False).item(),
                       rollout_worker_restarts=self.worker_restarts, **timings)
        if self.task is not None:
            metrics["gold_reward"] = sum(map(self.task.gold_reward, rollout.prompt_texts, rollout.response_texts)) / len(rollout)
        self.metrics.log("ppo", self.global_step, {"round": round_index, "kl_coefficient": kl_coefficient, **metrics})
        warning = logprob_mismatch_warning(metrics["logprob_mismatch"], config.rollout.logprob_mismatch_warning, self.global_step)
        if warning:
            logger.warning(warning)
        return metrics

    def ppo_rewards(self, scores: List[float]) -> List[float]:
        """The RM's scores as PPO's sequence rewards (before clipping): normalised by the running moments of
        this round's scores, or as they are."""
        if self.config.ppo.reward_normalization == "none":
            return scores
        self.reward_moments.update(torch.tensor(scores))
        return normalize_rewards(torch.tensor(scores), self.reward_moments.mean, self.reward_moments.std).tolist()

    def sync_weights(self) -> None:
        """Rank 0's policy into every rollout worker, in buckets (rayrlhf/actors/weight_sync.py). The driver
        handles references only: through the object store, or a broadcast in the trainer's and workers' group."""
        self.weights_version += 1
        rollout, trainer, workers = self.config.rollout, self.actors.ppo_trainer.actors[0], self.actors.rollout_workers
        bucket_bytes = int(rollout.weight_sync_bucket_mb * 2**20)
        if rollout.weight_sync == "object_store":
            buckets = trainer.policy_to_object_store.remote(bucket_bytes)  # resolved in each worker, not here
            ray.get([w.load_weight_buckets.remote(buckets, self.weights_version) for w in workers])
            return
        if rollout.weight_sync == "cuda_ipc":
            handles = trainer.policy_on_gpu.remote(bucket_bytes)
            ray.get([w.load_shared_buckets.remote(handles, self.weights_version) for w in workers])
            return
        if self.weight_plan is None:  # first sync: form the group, agree on the bucket layout
            address, port = ray.get(trainer.rendezvous_address.remote())
            members = 1 + len(workers)
            ray.get([trainer.join_weight_group.remote(address, port, members)]
                    + [w.join_weight_group.remote(address, port, index + 1, members) for index, w in enumerate(workers)])
            self.weight_plan = ray.get(trainer.policy_bucket_plan.remote(bucket_bytes))
        ray.get([trainer.broadcast_policy.remote(self.weight_plan)]
                + [w.receive_policy.remote(self.weight_plan, self.weights_version) for w in workers])

    # ---- checkpoints and outputs -----------------------------------------------------------------
    def checkpoint(self, round_index: int) -> None:
        staging = begin_checkpoint(self.run_dir, round_index)
        self.actors.reward_learner.call("save_checkpoint", str(staging))
        self.actors.ppo_trainer.call("save_checkpoint", str(staging), round_index)
        state = {"round": round_index, "kl_coefficient": self.kl.value, "history": self.history, "global_step": self.global_step}
        self.last_checkpoint = commit_checkpoint(staging, state, self.config.keep_checkpoints)

    def save_final_models(self) -> None:
        """The policy and the RM as transformers folders (each written under a temporary name, then renamed)."""
        self.actors.ppo_trainer.call_first("save_policy", str(self.run_dir / "policy"))
        self.actors.reward_learner.call("save_model", str(self.run_dir / "reward_model"))

    def close(self) -> None:
        self.metrics.close()


def _groups(rollout: Rollout) -> List[Tuple[str, List[str]]]:
    """(prompt, its k response texts) from a prompt-major rollout."""
    k = rollout.group_size
    return [(rollout.prompt_texts[i], rollout.response_texts[i : i + k]) for i in range(0, len(rollout), k)]


def _prefixed(prefix: str, values: Dict[str, float]) -> Dict[str, float]:
    return {prefix + name: value for name, value in values.items()}
