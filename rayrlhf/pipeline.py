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
import contextlib
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

from rayrlhf.actors.placement import reserve, start_actor
from rayrlhf.actors.ppo_trainer import PPOTrainer, PPOTrainerGroup
from rayrlhf.actors.reward_learner import RewardLearner, RewardLearnerGroup
from rayrlhf.actors.rollout_worker import RolloutWorker
from rayrlhf.actors.weight_sync import WeightSync
from rayrlhf.algos.kl import AdaptiveKLController, FixedKLController
from rayrlhf.algos.rewards import RunningRewardMoments, gold_pair_accuracy, normalize_rewards, reward_difference_statistics
from rayrlhf.checkpoints import begin_checkpoint, checkpoint_path, commit_checkpoint, latest_intact_checkpoint, read_state
from rayrlhf.config import RunConfig
from rayrlhf.errors import ConfigError, TrainingDivergedError, naming_the_file
from rayrlhf.seeds import Stream, loop_seed, worker_seed
from rayrlhf.logs import actor_environment
from rayrlhf.data.rollouts import Rollout
from rayrlhf.data.sources import load_preference_pairs, split_by_prompt
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.evaluation.held_out import HeldOutJudging
from rayrlhf.evaluation.judging import build_judge
from rayrlhf.metrics import MetricsLogger

import torch


logger = logging.getLogger(__name__)


@dataclass
class PendingRollout:
    """A generation asked of the rollout workers and not yet collected: per worker (index, handle, the generate
    call's arguments, its future)."""

    parts: List[Tuple[int, object, tuple, object]]


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
    sft_pairs = list(zip(train["prompt"], train["chosen"]))
    if data.preference.format == "synthetic" and data.synthetic.demonstrations == "unbiased":
        training = set(train_prompts)
        sft_pairs = [pair for pair in SyntheticPreferenceTask(data.synthetic, config.seed).demonstrations() if pair[0] in training]
    check_sample_sizes(config, len(train_prompts), len(meta), len(sft_pairs))
    return PromptSets(train_prompts, meta, sft_pairs, held_out)


def check_sample_sizes(config: RunConfig, train_prompts: int, meta_prompts: int, sft_pairs: int) -> None:
    """Each PPO step samples rollout_batch_size distinct training prompts, each round meta_prompts_per_round
    distinct meta prompts, each SFT step sft.batch_size distinct pairs; the PPO ranks size their micro-batches
    from those numbers, so too few is an error here, before any actor starts, not a smaller batch later."""
    wanted = [("ppo.rollout_batch_size", config.ppo.rollout_batch_size, train_prompts,
               "the training split of data.preference (after data.eval_fraction)"),
              ("reward.meta_prompts_per_round", config.reward.meta_prompts_per_round, meta_prompts,
               "data.meta_prompts" if config.data.meta_prompts is not None else "the training split of data.preference"),
              ("sft.batch_size", config.sft.batch_size if config.sft.steps else 0, sft_pairs,
               "the training split of data.preference (its chosen responses)")]
    for name, asked, available, where in wanted:
        if asked > available:
            raise ConfigError(f"{name}={asked} but {where} has {available} to draw from; lower {name} or give "
                              "more data")


@dataclass
class Actors:
    rollout_workers: List
    reward_learner: RewardLearnerGroup
    ppo_trainer: PPOTrainerGroup
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
    learner = _reward_learner_ranks(config, group, slots, environment)
    trainer = PPOTrainerGroup([start_actor(PPOTrainer, group, next(slots), resources, config, rank, resources.ppo_ranks,
                                           environment=environment) for rank in range(resources.ppo_ranks)])
    learner.form_process_group()
    trainer.form_process_group()
    return Actors(workers, learner, trainer, group, owns_placement=given is None)


def _reward_learner_ranks(config: RunConfig, group: PlacementGroup, slots, environment) -> RewardLearnerGroup:
    """resources.reward_learner_ranks RewardLearner ranks, one in each next bundle of `slots`."""
    ranks = config.resources.reward_learner_ranks
    return RewardLearnerGroup([start_actor(RewardLearner, group, next(slots), config.resources, config, rank, ranks,
                                           environment=environment) for rank in range(ranks)])


def start_reward_learner(config: RunConfig, given: PlacementGroup, first_bundle: int) -> RewardLearnerGroup:
    """The reward-learner ranks alone, in bundles first_bundle... of `given` (a Tune trial of the RM phase); the
    caller forms their process group (inside its clean-up, which kills them if that fails)."""
    return _reward_learner_ranks(config, given, iter(range(first_bundle, 10**6)), actor_environment(config.log_level))


def train_reward_model_epochs(learner: RewardLearnerGroup, first_epoch: int, last_epoch: int,
                              on_epoch: Callable[[Dict[str, float], Dict[str, bytes]], None]) -> None:
    """The RM phase alone, on the fixed data: epochs first_epoch..last_epoch, each followed by the held-out
    evaluation; on_epoch gets the epoch's results and the RM's checkpoint files (every rank's share)."""
    for epoch in range(first_epoch, last_epoch + 1):
        results = {"epoch": epoch, **learner.train_epoch(epoch), **learner.evaluate()}
        files: Dict[str, bytes] = {}
        for rank_files in learner.checkpoint_files():
            files.update(rank_files)
        on_epoch(results, files)


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
        self.weight_sync = WeightSync(actors.ppo_trainer.actors[0], actors.rollout_workers, config.rollout.weight_sync,
                                      config.rollout.weight_sync_bucket_mb)
        self.worker_restarts = 0
        self.last_checkpoint: Optional[Path] = None
        self.held_out = self._held_out_judging()

    def _held_out_judging(self) -> Optional[HeldOutJudging]:
        evaluation = self.config.evaluation
        if not evaluation.every_rounds:
            return None
        return HeldOutJudging(build_judge(self.config), self.prompts.held_out, evaluation.samples_per_prompt,
                              evaluation.tie_margin, loop_seed(self.config.seed, Stream.HELD_OUT_JUDGING), self.run_dir)

    def sample_texts(self, prompts: List[str], n: int, seed: int) -> List[str]:
        """The current policy's response texts (n per prompt, prompt-major) from the rollout workers."""
        return self.generate(prompts, n, seed, 0).response_texts

    # ---- start ---------------------------------------------------------------------------------
    def checkpoint_to_resume(self) -> Optional[Path]:
        """The newest intact checkpoint; each newer damaged one is named on the console, skipped, and later
        overwritten by the round that redoes it."""
        checkpoint, damaged = latest_intact_checkpoint(self.run_dir)
        for line in damaged:
            print(f"warning: {line}; resuming from an older one", file=sys.stderr)
        return checkpoint

    def start(self) -> int:
        """Fresh start (SFT, initial RM, round-0 checkpoint) or resume; returns the last finished round."""
        learner, trainer = self.actors.reward_learner, self.actors.ppo_trainer
        checkpoint = self.checkpoint_to_resume() if self.config.resume else None
        if checkpoint is not None:
            state = read_state(checkpoint)
            trainer.build(None, str(self.run_dir / "reference"))
            trainer.load_checkpoint(str(checkpoint))
            learner.load_checkpoint(str(checkpoint))
            self.kl.value, self.history, self.global_step = state["kl_coefficient"], state["history"], state["global_step"]
            self.metrics.rewind(state["round"], state["global_step"])
            self.last_checkpoint = checkpoint
            print(f"resumed from {checkpoint} (round {state['round']} done)", file=sys.stderr)
            self.weight_sync.push()
            if self.held_out is not None and not self.held_out.load_initial():
                self.held_out = None
            return state["round"]
        started = time.perf_counter()
        with where_in_run("initial reward-model training"):
            initial = learner.train_initial()
        initial.update({f"initial_{k}": v for k, v in learner.evaluate().items()})
        critic_weights = learner.critic_weights_reference() if self.config.ppo.critic_from_reward_model else None
        trainer.build(critic_weights, None)
        initial.update(self.supervised_warm_up())
        trainer.save_policy(str(self.run_dir / "reference"), True)
        initial["start_seconds"] = time.perf_counter() - started
        self.metrics.log("start", 0, initial)
        self.checkpoint(0)
        self.weight_sync.push()
        if self.held_out is not None:
            self.held_out.record_initial(self.sample_texts)
        return 0

    def supervised_warm_up(self) -> Dict[str, float]:
        sft, trainer = self.config.sft, self.actors.ppo_trainer
        if not sft.steps:
            return {}
        rng = random.Random(loop_seed(self.config.seed, Stream.SFT_BATCHES))
        losses = []
        # mininterval: where stderr is a file or a pipe, each redraw is a line of its own
        for step in tqdm(range(sft.steps), desc="SFT warm-up", file=sys.stderr, leave=False, mininterval=1.0):
            batch = rng.sample(self.prompts.sft, sft.batch_size)
            with where_in_run(f"SFT step {step + 1}"):
                losses.append(trainer.sft_step([p for p, _ in batch], [r for _, r in batch])["sft_loss"])
            self.metrics.log("sft", step + 1, {"sft_loss": losses[-1]})
        trainer.end_sft()
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
        """One round as its phases, each timed into the summary as PHASE_seconds: meta sampling, the RM's
        diagnostics and evaluation (before and after its training), RM training, the PPO steps, judging."""
        config = self.config
        summary: Dict[str, float] = {"round": round_index}
        ppo_steps = config.ppo.steps_per_round
        with tqdm(total=ppo_steps + 2, desc=f"round {round_index}/{config.rounds}", file=sys.stderr, leave=False) as bar:
            bar.set_postfix_str("sampling meta data")
            with timed(summary, "meta_sampling"):
                groups = self.sample_meta_groups(round_index)
            with timed(summary, "rm_evaluation"):
                diagnostics, rewards_before = self.group_diagnostics(groups)
                summary.update(_prefixed("before_rm_", diagnostics))
            bar.update()

            bar.set_postfix_str("training the reward model")
            with timed(summary, "rm_training"):
                summary.update(self.train_reward_model(round_index, groups))
            with timed(summary, "rm_evaluation"):
                summary.update(self.actors.reward_learner.evaluate())
                diagnostics, rewards = self.group_diagnostics(groups)
                summary.update(diagnostics)
                self.save_samples(round_index, groups, rewards_before, rewards)
            bar.update()

            with timed(summary, "ppo_steps"):
                summary.update(self.ppo_steps(round_index, bar))
        if self.held_out is not None and round_index % config.evaluation.every_rounds == 0:
            with timed(summary, "judging"):
                summary.update(self.held_out.judge_policy(self.sample_texts))
        summary["kl_coefficient"] = self.kl.value
        summary.update(self.peak_memory())
        return summary

    def sample_meta_groups(self, round_index: int) -> List[Tuple[str, List[str]]]:
        """MetaRM's meta data of the round: samples_per_prompt responses of the current policy to each of
        meta_prompts_per_round prompts, as (prompt, responses) groups."""
        config = self.config
        rng = random.Random(loop_seed(config.seed, Stream.META_PROMPTS, round_index))
        meta_prompts = rng.sample(self.prompts.meta, config.reward.meta_prompts_per_round)
        meta = self.generate(meta_prompts, config.reward.samples_per_prompt,
                             loop_seed(config.seed, Stream.META_SAMPLING, round_index), round_index)
        return _groups(meta)

    def train_reward_model(self, round_index: int, groups: List[Tuple[str, List[str]]]) -> Dict[str, float]:
        """The round's RM training (from the initial RM with reset_each_round; none without train_each_round);
        MetaRM's meta data are the policy's groups unless meta_source is the fixed data."""
        reward, learner = self.config.reward, self.actors.reward_learner
        if not reward.train_each_round:
            return {"rm_steps": 0}
        if reward.reset_each_round:
            learner.load_checkpoint(str(checkpoint_path(self.run_dir, 0)))
        use_policy_meta = reward.method == "metarm" and reward.meta_source == "policy"
        with where_in_run(f"round {round_index}, reward-model training"):
            return learner.train_round(round_index, groups if use_policy_meta else None)

    def ppo_steps(self, round_index: int, bar: tqdm) -> Dict[str, float]:
        """The round's PPO steps; their metrics averaged."""
        ppo_steps = self.config.ppo.steps_per_round
        step_metrics = []
        self.reward_moments.reset()  # the RM just changed: its scores have a new scale
        prefetched = None  # asynchronous mode: the next step's rollout, generated during this step's update
        for step in range(1, ppo_steps + 1):
            bar.set_postfix_str(f"PPO step {step}/{ppo_steps}")
            metrics, prefetched = self.ppo_step(round_index, step, prefetched)
            step_metrics.append(metrics)
            bar.update()
        return {name: sum(m[name] for m in step_metrics) / len(step_metrics) for name in step_metrics[0]}

    def peak_memory(self) -> Dict[str, float]:
        """Each role's peak process memory so far (GiB; the largest of its actors): RSS on CPU, allocated on GPU."""
        actors = self.actors
        roles = {"rollout": actors.rollout_workers, "reward": actors.reward_learner.actors, "ppo": actors.ppo_trainer.actors}
        peaks = {f"peak_memory_gb_{role}": max(ray.get([actor.peak_memory_gb.remote() for actor in members]))
                 for role, members in roles.items()}
        return {**peaks, "peak_memory_gb": max(peaks.values())}

    def generate(self, prompts: List[str], n: int, seed: int, round_index: int) -> Rollout:
        """n samples per prompt, the prompts split contiguously over the rollout workers."""
        return self.finish_generation(self.start_generation(prompts, n, seed, round_index))

    def start_generation(self, prompts: List[str], n: int, seed: int, round_index: int) -> "PendingRollout":
        """Ask the rollout workers for n samples per prompt (each worker a contiguous share of the prompts) without
        waiting for them; finish_generation collects them."""
        workers = self.actors.rollout_workers
        share = -(-len(prompts) // len(workers))
        temperature = self.config.rollout.temperature
        parts = []
        for i, worker in enumerate(workers):
            part = prompts[i * share : (i + 1) * share]
            if part:
                request = (part, n, temperature, worker_seed(seed, i), round_index)
                parts.append((i, worker, request, worker.generate.remote(*request)))
        return PendingRollout(parts)

    def finish_generation(self, pending: "PendingRollout") -> Rollout:
        """The samples start_generation asked for. A worker whose process died is restarted by Ray; it then gets
        the current weights and redoes its part, with the same seed, so the batch is the one it would have been
        (in asynchronous mode, with the weights of one update later)."""
        results = []
        for i, worker, request, future in pending.parts:
            try:
                results.append(ray.get(future))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
                self.worker_restarts += 1
                if self.worker_restarts > self.config.resources.rollout_worker_restarts:
                    raise
                logger.warning("rollout worker %d died (%s); restarted, re-synced, regenerating its part", i, type(error).__name__)
                self.weight_sync.resync(worker)
                results.append(ray.get(worker.generate.remote(*request)))
        return Rollout.concatenate(results)

    def save_samples(self, round_index: int, groups, rewards_before: torch.Tensor, rewards: torch.Tensor) -> None:
        """The round's meta data as JSONL: prompt, responses, the RM's scores before and after the round's training
        (`rewards_before_rm`, `rewards`) and, on the synthetic task, `gold`. To read, to draw (python -m rayrlhf.eval),
        or to reuse as fixed meta data."""
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"round_{round_index:04d}_meta.jsonl"
        with naming_the_file(path), open(path, "w", encoding="utf-8") as handle:
            for (prompt, responses), before, after in zip(groups, rewards_before.tolist(), rewards.tolist()):
                record = {"prompt": prompt, "responses": responses, "rewards_before_rm": before, "rewards": after}
                if self.task is not None:
                    record["gold"] = [self.task.gold_reward(prompt, response) for response in responses]
                handle.write(json.dumps(record) + "\n")

    def group_diagnostics(self, groups) -> Tuple[Dict[str, float], torch.Tensor]:
        """Reward-difference statistics of the RM on the policy's k samples per prompt, and (synthetic task)
        gold reward and the RM's accuracy on gold-labelled pairs of those samples; and the (P, k) scores."""
        rewards = torch.tensor(self.actors.reward_learner.group_scores(groups))
        results = reward_difference_statistics(rewards)
        if self.task is not None:
            gold = torch.tensor([[self.task.gold_reward(p, r) for r in responses] for p, responses in groups])
            results.update(gold_pair_accuracy(rewards, gold))
            results["policy_gold_reward"] = gold.mean().item()
        return results, rewards

    def ppo_step(self, round_index: int, step: int, prefetched: Optional[Rollout] = None
                 ) -> Tuple[Dict[str, float], Optional[Rollout]]:
        """One PPO step: rollout (or the one `prefetched` during the previous step's update), scores, update, weight
        sync. With rollout.asynchronous the next step's rollout is generated during this update, on the weights
        before it, and returned with the metrics. generation_seconds is the time the step waited for generation."""
        config = self.config
        self.global_step += 1
        timings: Dict[str, float] = {}
        started = time.perf_counter()
        rollout = prefetched or self.finish_generation(self.start_step_generation(round_index, step))
        timings["generation_seconds"] = time.perf_counter() - started
        if not config.rollout.asynchronous:  # asynchronous: the generation's own time is hidden behind the update
            timings["generation_tokens_per_second"] = rollout.num_tokens / timings["generation_seconds"]

        started = time.perf_counter()
        scores = self.actors.reward_learner.score(rollout.prompt_texts, rollout.response_texts)
        timings["scoring_seconds"] = time.perf_counter() - started

        ahead = (self.start_step_generation(round_index, step + 1)
                 if config.rollout.asynchronous and step < config.ppo.steps_per_round else None)
        started = time.perf_counter()
        kl_coefficient = self.kl.value
        with where_in_run(f"round {round_index}, PPO step {step} (global step {self.global_step})"):
            metrics = self.actors.ppo_trainer.ppo_step(rollout, self.ppo_rewards(scores), kl_coefficient,
                                                       loop_seed(config.seed, Stream.PPO_UPDATE, round_index, step), round_index)
        timings["ppo_seconds"] = time.perf_counter() - started
        timings["ppo_tokens_per_second"] = rollout.num_tokens * config.ppo.epochs / timings["ppo_seconds"]
        self.kl.update(metrics["kl_per_sequence"], len(rollout))

        started = time.perf_counter()
        next_rollout = self.finish_generation(ahead) if ahead else None  # before the sync, which must not change its weights
        timings["generation_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        self.weight_sync.push()
        timings["weight_sync_seconds"] = time.perf_counter() - started

        scores_tensor = torch.tensor(scores)
        metrics.update(reward_mean=scores_tensor.mean().item(), reward_std=scores_tensor.std(unbiased=False).item(),
                       rollout_worker_restarts=self.worker_restarts, **timings)
        if self.task is not None:
            metrics["gold_reward"] = sum(map(self.task.gold_reward, rollout.prompt_texts, rollout.response_texts)) / len(rollout)
        self.metrics.log("ppo", self.global_step, {"round": round_index, "kl_coefficient": kl_coefficient, **metrics})
        warning = logprob_mismatch_warning(metrics["logprob_mismatch"], config.rollout.logprob_mismatch_warning, self.global_step)
        if warning and prefetched is None:  # a prefetched rollout is one update behind: its mismatch is the lag
            logger.warning(warning)
        return metrics, next_rollout

    def start_step_generation(self, round_index: int, step: int) -> "PendingRollout":
        """Start the rollout of PPO step `step`: rollout_batch_size training prompts, n_per_prompt samples each."""
        config = self.config
        rng = random.Random(loop_seed(config.seed, Stream.PPO_PROMPTS, round_index, step))
        prompts = rng.sample(self.prompts.train, config.ppo.rollout_batch_size)
        return self.start_generation(prompts, config.rollout.n_per_prompt,
                                     loop_seed(config.seed, Stream.PPO_SAMPLING, round_index, step), round_index)

    def ppo_rewards(self, scores: List[float]) -> List[float]:
        """The RM's scores as PPO's sequence rewards (before clipping): normalised by the running moments of
        this round's scores, or as they are."""
        if self.config.ppo.reward_normalization == "none":
            return scores
        self.reward_moments.update(torch.tensor(scores))
        return normalize_rewards(torch.tensor(scores), self.reward_moments.mean, self.reward_moments.std).tolist()

    # ---- checkpoints and outputs -----------------------------------------------------------------
    def checkpoint(self, round_index: int) -> None:
        """Both learners' state and the driver's, committed at once (rayrlhf/checkpoints.py); its time is
        logged as a `checkpoint` record of its own, after the round's (which the checkpoint holds)."""
        started = time.perf_counter()
        staging = begin_checkpoint(self.run_dir, round_index)
        with where_in_run(f"round {round_index} checkpoint"):
            self.actors.reward_learner.save_checkpoint(str(staging))
            self.actors.ppo_trainer.save_checkpoint(str(staging), round_index)
        state = {"round": round_index, "kl_coefficient": self.kl.value, "history": self.history, "global_step": self.global_step}
        self.last_checkpoint = commit_checkpoint(staging, state, self.config.keep_checkpoints)
        self.metrics.log("checkpoint", round_index, {"checkpoint_seconds": time.perf_counter() - started})

    def save_final_models(self) -> None:
        """The policy and the RM as transformers folders (each written under a temporary name, then renamed)."""
        with where_in_run("saving the final models"):
            self.actors.ppo_trainer.save_policy(str(self.run_dir / "policy"))
            self.actors.reward_learner.save_model(str(self.run_dir / "reward_model"))

    def close(self) -> None:
        self.metrics.close()


def _groups(rollout: Rollout) -> List[Tuple[str, List[str]]]:
    """(prompt, its k response texts) from a prompt-major rollout."""
    k = rollout.group_size
    return [(rollout.prompt_texts[i], rollout.response_texts[i : i + k]) for i in range(0, len(rollout), k)]


@contextlib.contextmanager
def where_in_run(stage: str):
    """An actor's TrainingDivergedError (raised inside Ray's wrapper) re-raised as one paragraph that says where in
    the run it happened."""
    try:
        yield
    except TrainingDivergedError as error:
        raise TrainingDivergedError(f"{stage}: {getattr(error, 'cause', None) or error}") from None


@contextlib.contextmanager
def timed(summary: Dict[str, float], phase: str):
    """Adds the time spent inside to summary[PHASE_seconds] (a phase may run in several pieces)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        summary[f"{phase}_seconds"] = summary.get(f"{phase}_seconds", 0.0) + time.perf_counter() - started


def _prefixed(prefix: str, values: Dict[str, float]) -> Dict[str, float]:
    return {prefix + name: value for name, value in values.items()}
