"""PPOTrainer: one rank of the PPO group, holding policy, critic and reference (rayrlhf/training/ppo_learner.py).

Every rank receives the whole rollout and trains on its own contiguous share of the rows; rank 0 hands
out the policy weights for the rollout workers. The driver calls the ranks through PPOTrainerGroup (below).
"""
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import ray
import torch

from rayrlhf.config import RunConfig
from rayrlhf.data.batches import encode_prompts, end_token_id
from rayrlhf.data.reward_data import task_tokenizer
from rayrlhf.data.rollouts import Rollout
from rayrlhf.faults import inject_fault, poisons_with_nan
from rayrlhf.memory import releasing_memory
from rayrlhf.models.build import build_causal_lm, build_reward_model, load_tokenizer, save_model
from rayrlhf.models.heads import attach_group_head
from rayrlhf.seeds import critic_init_seed
from rayrlhf.training.distributed import init_distributed, teardown_distributed
from rayrlhf.training.ppo_learner import PPOLearner

from rayrlhf.actors.placement import RankActor, RankGroup, prepare_actor_process
from rayrlhf.training.weight_buckets import (BroadcastGroup, TensorSlot, distinct_tensors, pack_bucket, plan_buckets,
                                        share_on_gpu)


class PPOTrainer(RankActor):
    def __init__(self, config: RunConfig, rank: int, world_size: int):
        prepare_actor_process(config, f"ppo_trainer_{rank}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.tokenizer = load_tokenizer(config.policy, task_tokenizer(config.data, config.seed))
        self.learner: Optional[PPOLearner] = None

    def join_process_group(self, master_addr: str, master_port: int) -> None:
        init_distributed(self.config.resources.device, self.rank, self.world_size, master_port, master_addr)

    @releasing_memory
    def build(self, critic_weights: Optional[Dict[str, torch.Tensor]], reference_folder: Optional[str]) -> None:
        """Policy from config.policy; critic from the RM's weights (or the policy's backbone with a fresh
        head); the reference is the policy as built, or the saved one when resuming."""
        config = self.config
        policy = build_causal_lm(config.policy, self.tokenizer, seed=config.seed)
        critic_spec = config.reward_model if config.ppo.critic_from_reward_model else config.policy
        critic = build_reward_model(critic_spec, self.tokenizer, seed=critic_init_seed(config.seed))
        if critic_weights is not None:
            critic.load_state_dict(critic_weights)
        if config.ppo.group_invariant.enabled:
            attach_group_head(critic, config.ppo.group_invariant.groups, seed=critic_init_seed(config.seed))
        rows = config.ppo.rollout_batch_size * config.rollout.n_per_prompt
        self.learner = PPOLearner(policy, critic, config.ppo, micro_batch_size=rows // self.world_size // config.ppo.mini_batches,
                                  pad_id=self.tokenizer.pad_token_id, device=config.resources.device)
        if reference_folder:
            reference = build_causal_lm(config.policy.model_copy(update={"source": reference_folder}), self.tokenizer)
            self.learner.reference = reference.to(self.learner.device).eval().requires_grad_(False)

    def _mine(self, items: Sequence) -> list:
        share = len(items) // self.world_size
        return list(items[self.rank * share : (self.rank + 1) * share])

    @releasing_memory
    def sft_step(self, prompts: Sequence[str], responses: Sequence[str]) -> Dict[str, float]:
        """One supervised step on this rank's share of (prompt, response) texts; the response ends with eos."""
        limit = self.config.data.max_response_tokens - 1
        responses = [self.tokenizer(r, add_special_tokens=False)["input_ids"][:limit] + [end_token_id(self.tokenizer)]
                     for r in self._mine(responses)]
        prompt_ids = encode_prompts(self.tokenizer, self._mine(prompts), self.config.data.max_prompt_tokens)
        return self.learner.sft_step(prompt_ids, responses, self.config.sft.lr)

    def end_sft(self) -> None:
        self.learner.end_sft()

    @releasing_memory
    def ppo_step(self, rollout: Rollout, scores: List[float], kl_coefficient: float, seed: int, round_index: int) -> Dict[str, float]:
        """One PPO step on this rank's share of the rollout; returns metrics averaged over ranks."""
        inject_fault("ppo_step", round_index, self.config.run_dir)
        if poisons_with_nan("ppo_step", round_index):
            scores = [math.nan] * len(scores)
        share = len(rollout) // self.world_size
        mine = rollout.rows(self.rank * share, (self.rank + 1) * share)
        torch.manual_seed(seed)
        experience = self.learner.experience(mine, torch.tensor(self._mine(scores)), kl_coefficient)
        trained = self.learner.train(experience, seed)
        return self.learner.summarise(experience, trained)

    def policy_weights(self) -> Dict[str, torch.Tensor]:
        return self.learner.policy_weights()

    # ---- weight sync into the rollout workers (rank 0 only; rayrlhf/training/weight_buckets.py) ----
    def policy_bucket_plan(self, bucket_bytes: int) -> List[List[TensorSlot]]:
        return plan_buckets(distinct_tensors(self.learner.policy.module.state_dict()), bucket_bytes)

    def policy_to_object_store(self, bucket_bytes: int) -> List[ray.ObjectRef]:
        """The policy as buckets in the object store: one (slots, uint8 array) object per bucket."""
        tensors = distinct_tensors(self.learner.policy.module.state_dict())
        return [ray.put((bucket, pack_bucket(tensors, bucket).cpu().numpy())) for bucket in plan_buckets(tensors, bucket_bytes)]

    def policy_on_gpu(self, bucket_bytes: int) -> List[tuple]:
        """(slots, CUDA IPC handle) per bucket; the buckets stay alive here until the next sync."""
        tensors = distinct_tensors(self.learner.policy.module.state_dict())
        self.shared_buckets = [(bucket, pack_bucket(tensors, bucket)) for bucket in plan_buckets(tensors, bucket_bytes)]
        return [(bucket, share_on_gpu(flat)) for bucket, flat in self.shared_buckets]

    def join_weight_group(self, address: str, port: int, members: int) -> None:
        self.weight_group = BroadcastGroup(address, port, 0, members, self.config.resources.device)

    def broadcast_policy(self, plan: List[List[TensorSlot]]) -> None:
        self.weight_group.send(distinct_tensors(self.learner.policy.module.state_dict()), plan)

    def greedy_decode(self, prompts: Sequence[str]) -> List[List[int]]:
        prompt_ids = encode_prompts(self.tokenizer, prompts, self.config.data.max_prompt_tokens)
        return self.learner.greedy_decode(prompt_ids, self.config.rollout.max_new_tokens, end_token_id(self.tokenizer))

    def save_checkpoint(self, folder: str, round_index: int = 0) -> None:
        self.learner.save_checkpoint(Path(folder) / "ppo")
        inject_fault("save_checkpoint", round_index, self.config.run_dir)  # killed with the checkpoint half written

    def load_checkpoint(self, folder: str) -> None:
        self.learner.load_checkpoint(Path(folder) / "ppo")

    def save_policy(self, folder: str, reference: bool = False) -> None:
        """The policy (or the frozen reference) as a transformers folder; rank 0 writes."""
        if self.rank == 0:
            save_model(self.learner.reference if reference else self.learner.policy.module, self.tokenizer, Path(folder))

    def shutdown(self) -> None:
        teardown_distributed()


class PPOTrainerGroup(RankGroup[PPOTrainer]):
    """The driver's side of the PPO trainer: each method runs PPOTrainer's method of the same name on every rank
    at once and returns rank 0's answer. Weight sync talks to rank 0 alone (rayrlhf/pipeline.py)."""

    def build(self, critic_weights, reference_folder: Optional[str]) -> None:
        """critic_weights: a dict of tensors, an ObjectRef of one (resolved in each rank), or None."""
        self.on_every_rank(lambda rank: rank.build.remote(critic_weights, reference_folder))

    def sft_step(self, prompts: Sequence[str], responses: Sequence[str]) -> Dict[str, float]:
        return self.on_every_rank(lambda rank: rank.sft_step.remote(prompts, responses))[0]

    def end_sft(self) -> None:
        self.on_every_rank(lambda rank: rank.end_sft.remote())

    def ppo_step(self, rollout: Rollout, scores: List[float], kl_coefficient: float, seed: int,
                 round_index: int) -> Dict[str, float]:
        return self.on_every_rank(
            lambda rank: rank.ppo_step.remote(rollout, scores, kl_coefficient, seed, round_index))[0]

    def save_checkpoint(self, folder: str, round_index: int = 0) -> None:
        self.on_every_rank(lambda rank: rank.save_checkpoint.remote(folder, round_index))

    def load_checkpoint(self, folder: str) -> None:
        self.on_every_rank(lambda rank: rank.load_checkpoint.remote(folder))

    def save_policy(self, folder: str, reference: bool = False) -> None:
        self.on_every_rank(lambda rank: rank.save_policy.remote(folder, reference))
