"""Each actor's peak memory, estimated from the config and the models' shapes before any actor starts, and a
run refused when the actors cannot fit the node.

An actor holds its process's base (measured) and its models' states for the whole run (`resident`), and
needs more only while its phase runs (`working`: what a forward pass keeps for backward, logits, a KV
cache). The round loop runs one phase at a time, so the node's peak is every actor's resident memory plus
the largest working set (rayrlhf/memory.py does the arithmetic). On CPU that must fit the memory the node has
available when the run starts, less Ray's out-of-memory margin; on GPU the per-actor peaks are reported
(metrics `peak_memory_gb_*`) but not checked in advance.
"""
from dataclasses import dataclass, field
from typing import Dict, List

from rayrlhf.config import RunConfig
from rayrlhf.errors import ConfigError
from rayrlhf.memory import (GIB, PASS_OVERHEAD_GB, ModelShape, activation_bytes, gradient_bytes, logits_bytes,
                            optimizer_state_bytes, weights_bytes)

# Resident memory of a process beyond its models' states (benchmarks/results/memory.md)
LEARNER_PROCESS_GB = 0.9  # torch, transformers, DeepSpeed, a tokenizer: 0.86-0.92 GB measured with SmolLM2
VLLM_WORKER_PROCESS_GB = 1.8  # vLLM's engine in-process: a SmolLM2 worker held 2.9 GB with 0.5 GB weights, 0.5 KV
HF_WORKER_PROCESS_GB = 0.9  # not measured apart: taken as a learner's
OUT_OF_MEMORY_MARGIN = 0.95  # Ray's memory monitor kills workers above 95% of the node's memory


@dataclass
class ActorEstimate:
    """One actor's estimated memory in GiB, as named parts held for the whole run (`resident`) and only while
    its phase runs (`working`); `knobs` says which setting lowers which working part."""

    role: str
    resident: Dict[str, float]
    working: Dict[str, float]
    knobs: Dict[str, str] = field(default_factory=dict)

    @property
    def resident_gb(self) -> float:
        return sum(self.resident.values())

    @property
    def peak_gb(self) -> float:
        return self.resident_gb + sum(self.working.values())


def reward_learner_estimate(config: RunConfig, reward_model: ModelShape) -> ActorEstimate:
    reward, data, ranks = config.reward, config.data, config.resources.reward_learner_ranks
    tokens = data.max_prompt_tokens + data.max_response_tokens
    pairs = min(reward.micro_batch_size or reward.batch_size // ranks, reward.batch_size // ranks)
    sequences = 2 * pairs
    if reward.method == "metarm":
        meta_prompts = min(reward.meta_micro_batch_size or reward.meta_batch_size // ranks, reward.meta_batch_size // ranks)
        sequences = max(sequences, reward.samples_per_prompt * meta_prompts)
    activations = activation_bytes(reward_model, sequences, tokens, reward.gradient_checkpointing) / GIB
    if reward.method == "metarm" and reward.order == "second":
        activations *= 3  # Hessian-vector products keep the backward graph too: a guess, not measured
    backup = weights_bytes(reward_model) * (reward.inner_steps + 1 if reward.order == "second" else 1) / GIB
    return ActorEstimate(
        "reward learner rank",
        {"process": LEARNER_PROCESS_GB, "reward model and Adam": optimizer_state_bytes(reward_model) / GIB},
        {"gradients": gradient_bytes(reward_model) / GIB, "MetaRM's copy of θ": backup if reward.method == "metarm" else 0.0,
         "activations": activations + PASS_OVERHEAD_GB},
        {"activations": "reward.micro_batch_size / reward.meta_micro_batch_size, or reward.gradient_checkpointing=true"})


def ppo_trainer_estimate(config: RunConfig, policy: ModelShape, critic: ModelShape) -> ActorEstimate:
    ppo = config.ppo
    rows = config.ppo.rollout_batch_size * config.rollout.n_per_prompt // config.resources.ppo_ranks
    micro = min(ppo.micro_batch_size or rows // ppo.mini_batches, rows // ppo.mini_batches)
    forward_rows = min(ppo.forward_micro_batch_size or micro, rows)
    tokens, response = config.data.max_prompt_tokens + config.rollout.max_new_tokens, config.rollout.max_new_tokens
    update = (activation_bytes(policy, micro, tokens, ppo.gradient_checkpointing) + logits_bytes(policy, micro, response))
    no_grad = logits_bytes(policy, forward_rows, response)
    return ActorEstimate(
        "PPO trainer rank",
        {"process": LEARNER_PROCESS_GB, "reference policy": weights_bytes(policy) / GIB,
         "policy and critic, Adam": (optimizer_state_bytes(policy) + optimizer_state_bytes(critic)) / GIB},
        # policy and critic step one after the other: one model's gradients at a time
        {"gradients": max(gradient_bytes(policy), gradient_bytes(critic)) / GIB,
         "activations and logits": max(update, no_grad) / GIB + PASS_OVERHEAD_GB},
        {"activations and logits": "ppo.micro_batch_size / ppo.forward_micro_batch_size, or ppo.gradient_checkpointing=true"})


def rollout_worker_estimate(config: RunConfig, policy: ModelShape, engine: str) -> ActorEstimate:
    if engine == "vllm":  # vLLM allocates its KV cache once, at start
        return ActorEstimate("rollout worker", {"process": VLLM_WORKER_PROCESS_GB, "policy": weights_bytes(policy) / GIB,
                                                "KV cache": config.rollout.vllm_kv_cache_gb}, {})
    tokens = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    rows = max(config.ppo.rollout_batch_size * config.rollout.n_per_prompt,
               config.reward.meta_prompts_per_round * config.reward.samples_per_prompt) / config.resources.rollout_workers
    cache = 2 * rows * tokens * policy.layers * policy.hidden * policy.bytes_per_value  # keys and values, every layer
    return ActorEstimate("rollout worker", {"process": HF_WORKER_PROCESS_GB, "policy": weights_bytes(policy) / GIB},
                         {"KV cache": cache / GIB},
                         {"KV cache": "ppo.rollout_batch_size, rollout.n_per_prompt or resources.rollout_workers"})


def estimate_actors(config: RunConfig, shapes: Dict[str, ModelShape], engine: str) -> List[ActorEstimate]:
    """Every actor's estimate (rollout workers, reward-learner ranks, PPO ranks). shapes: `policy` (causal LM),
    `reward_model` and `critic` (scalar-head models)."""
    resources = config.resources
    return ([rollout_worker_estimate(config, shapes["policy"], engine)] * resources.rollout_workers
            + [reward_learner_estimate(config, shapes["reward_model"])] * resources.reward_learner_ranks
            + [ppo_trainer_estimate(config, shapes["policy"], shapes["critic"])] * resources.ppo_ranks)


def node_peak_gb(estimates: List[ActorEstimate]) -> float:
    """Every actor's resident memory plus the largest working set (one phase runs at a time)."""
    return sum(e.resident_gb for e in estimates) + max((sum(e.working.values()) for e in estimates), default=0.0)


def check_memory(estimates: List[ActorEstimate], available_gb: float) -> None:
    """ConfigError when the estimated node peak exceeds `available_gb` times Ray's margin, naming the largest
    working part that a setting lowers."""
    total, limit = node_peak_gb(estimates), available_gb * OUT_OF_MEMORY_MARGIN
    if total <= limit:
        return
    largest = max(((name, gb, e) for e in estimates for name, gb in e.working.items() if name in e.knobs),
                  key=lambda item: item[1], default=None)
    per_role: Dict[str, ActorEstimate] = {}
    for estimate in estimates:
        per_role.setdefault(estimate.role, estimate)
    roles = ", ".join(f"{role} {e.resident_gb:.1f} + {sum(e.working.values()):.1f}" for role, e in per_role.items())
    hint = (f" The largest part that a setting lowers: the {largest[2].role}'s {largest[0]} ({largest[1]:.1f} GiB): "
            f"lower {largest[2].knobs[largest[0]]}." if largest else "")
    raise ConfigError(
        f"the actors would need about {total:.1f} GiB of memory at the run's peak (GiB per actor, held throughout + "
        f"while its phase runs: {roles}) but the node has {available_gb:.1f} GiB available and Ray stops workers "
        f"above {OUT_OF_MEMORY_MARGIN:.0%} of it.{hint} Or set resources.check_memory=false to start anyway."
    )
