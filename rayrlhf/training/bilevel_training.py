"""Meta-training of a reward model by bilevel reward learning (reward.method bilevel, `python -m rayrlhf.train_rm`).

Each step takes the next domain (every domain in turn, in an order reshuffled each pass), draws
bilevel.support_prompts of its response groups and bilevel.query_pairs of its labelled pairs, tokenises them
for the policy and for the RM, asks the policy side (BilevelPolicy) for each response's weight and steps the RM
on the weighted rewards (RewardModelTrainer.weighted_reward_step).

With several ranks every rank draws the same step (the same seed) and keeps every world_size-th support prompt and
labelled pair from its rank on; the sums over samples and pairs are reduced across ranks where the math needs the
whole step (BilevelPolicy), so 2 ranks make the step of 1.
"""
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rayrlhf.config import BilevelConfig, DataConfig, RunConfig
from rayrlhf.data.batches import PreferenceBatch, ResponseGroupBatch, collate_groups, collate_pairs, encode_prompt_and_response
from rayrlhf.data.domains import Domain, bilevel_domains, describe_domains
from rayrlhf.data.reward_data import task_tokenizer
from rayrlhf.data.rollouts import SequenceBatch, collate_sequences
from rayrlhf.errors import ConfigError
from rayrlhf.models.build import build_causal_lm, load_tokenizer
from rayrlhf.training import distributed
from rayrlhf.training.bilevel_policy import BilevelPolicy
from rayrlhf.training.reward_trainer import RewardModelTrainer


@dataclass
class BilevelBatch:
    """One step's data: the support responses and the query pairs, tokenised for the policy and for the RM."""

    domain: str
    samples: SequenceBatch  # policy tokens, n = support prompts × k rows, prompt-major
    prompt_index: torch.Tensor  # (n,) the support prompt of each row
    chosen: SequenceBatch  # policy tokens of the query pairs
    rejected: SequenceBatch
    reward_samples: ResponseGroupBatch  # the same n responses in RM tokens
    reward_pairs: PreferenceBatch  # the query pairs in RM tokens
    total_samples: int  # support responses of the step over all ranks (n of the inner step's 1/n)
    total_pairs: int  # query pairs of the step over all ranks


class BilevelBatches:
    """Endless BilevelBatch-es over the domains, seeded."""

    def __init__(self, domains: List[Domain], bilevel: BilevelConfig, data: DataConfig,
                 policy_tokenizer: PreTrainedTokenizerBase, reward_tokenizer: PreTrainedTokenizerBase, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.domains, self.bilevel, self.data = domains, bilevel, data
        self.policy_tokenizer, self.reward_tokenizer = policy_tokenizer, reward_tokenizer
        self.rng = random.Random(seed)  # the same on every rank: the ranks draw the same step
        self.rank, self.world_size = rank, world_size

    def reseed(self, seed: int) -> None:
        """Draw from here on as from a fresh BilevelBatches of this seed (an epoch of a Tune trial, resumable)."""
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[BilevelBatch]:
        while True:
            order = list(self.domains)
            self.rng.shuffle(order)
            for domain in order:
                yield self.batch(domain)

    def batch(self, domain: Domain) -> BilevelBatch:
        all_groups = self.rng.sample(domain.support, min(self.bilevel.support_prompts, len(domain.support)))
        all_pairs = self.rng.sample(domain.query, min(self.bilevel.query_pairs, len(domain.query)))
        groups, pairs = all_groups[self.rank::self.world_size], all_pairs[self.rank::self.world_size]
        rows = [(group["prompt"], response) for group in groups for response in group["responses"]]
        samples = self._policy_sequences(rows)
        prompt_index = torch.arange(len(groups)).repeat_interleave(len(groups[0]["responses"]))
        chosen = self._policy_sequences([(pair["prompt"], pair["chosen"]) for pair in pairs])
        rejected = self._policy_sequences([(pair["prompt"], pair["rejected"]) for pair in pairs])
        reward_rows = [[self._reward_ids(group["prompt"], response) for response in group["responses"]] for group in groups]
        pad = self.reward_tokenizer.pad_token_id
        reward_pairs = collate_pairs([self._reward_ids(p["prompt"], p["chosen"]) for p in pairs],
                                     [self._reward_ids(p["prompt"], p["rejected"]) for p in pairs], pad)
        return BilevelBatch(domain.name, samples, prompt_index, chosen, rejected, collate_groups(reward_rows, pad), reward_pairs,
                            total_samples=sum(len(group["responses"]) for group in all_groups), total_pairs=len(all_pairs))

    def _policy_sequences(self, rows) -> SequenceBatch:
        encoded = [encode_prompt_and_response(self.policy_tokenizer, prompt, response, self.data.max_prompt_tokens,
                                              self.data.max_response_tokens) for prompt, response in rows]
        return collate_sequences([p for p, _ in encoded], [r for _, r in encoded], self.policy_tokenizer.pad_token_id)

    def _reward_ids(self, prompt: str, response: str):
        prompt_ids, response_ids = encode_prompt_and_response(self.reward_tokenizer, prompt, response,
                                                              self.data.max_prompt_tokens, self.data.max_response_tokens)
        return prompt_ids + response_ids


def bilevel_step(trainer: RewardModelTrainer, policy: BilevelPolicy, batch: BilevelBatch, vanilla_weight: float) -> Dict[str, float]:
    """One outer step: the RM scores the support responses, the policy side weighs them, the RM steps. The RM's
    engine averages the ranks' gradients, so each rank's share of the sums (Σ_i w_i r(s_i), its pairs' part of the
    mean loss) is scaled by world_size to make the average the whole step's sum."""
    ranks = distributed.world_size()
    scores = trainer.group_rewards([batch.reward_samples]).reshape(-1)
    weights, policy_values = policy.sample_weights(batch.samples, batch.prompt_index, scores, batch.chosen, batch.rejected,
                                                   batch.total_samples, batch.total_pairs)
    pairs_share = batch.reward_pairs.num_pairs / batch.total_pairs
    values = trainer.weighted_reward_step(batch.reward_samples, weights * ranks, batch.reward_pairs,
                                          vanilla_weight * pairs_share * ranks)
    # the step's metrics over all ranks: the weighted reward summed, the pairs' loss and accuracy averaged
    totals = torch.tensor([values["weighted_reward"] / ranks, values["loss"] * pairs_share, values["accuracy"] * pairs_share,
                           weights.square().sum().item()], dtype=torch.float64, device=trainer.device)
    distributed.sum_across_ranks(totals)
    weighted_reward, loss, accuracy, weight_square = totals.tolist()
    return {**values, **policy_values, "weighted_reward": weighted_reward, "loss": loss, "accuracy": accuracy,
            "weight_norm": weight_square ** 0.5}


def bilevel_train_steps(trainer: RewardModelTrainer, policy: BilevelPolicy, batches: BilevelBatches, steps: int,
                        vanilla_weight: float, on_step: Optional[Callable[[int, Dict[str, float]], None]] = None
                        ) -> List[Dict[str, float]]:
    """`steps` outer steps; returns each step's metrics."""
    history = []
    for step, batch in zip(range(1, steps + 1), batches):
        values = bilevel_step(trainer, policy, batch, vanilla_weight)
        history.append(values)
        if on_step:
            on_step(step, values)
    return history


def adapt_last_layers(policy: nn.Module, layers: int) -> None:
    """Freeze every parameter of a decoder-only policy but its last `layers` blocks and final norm (models whose
    decoder keeps its blocks in `.layers` and its norm in `.norm`, as Llama and SmolLM2 do)."""
    decoder = policy.get_decoder()
    if not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
        raise ConfigError(f"reward.bilevel.policy_layers needs a decoder with .layers and .norm; "
                          f"{type(policy).__name__} has neither: leave policy_layers unset")
    if layers > len(decoder.layers):
        raise ConfigError(f"reward.bilevel.policy_layers={layers} but the policy has {len(decoder.layers)} layers")
    policy.requires_grad_(False)
    for module in (*decoder.layers[-layers:], decoder.norm):
        module.requires_grad_(True)


@dataclass
class BilevelSetup:
    """What a bilevel meta-training needs beside the RM's engine: the reference policy's side, the batches, the
    steps of an epoch, and a line naming the domains."""

    policy: BilevelPolicy
    batches: BilevelBatches
    epoch_steps: int
    """Steps of one pass over the domains' labelled pairs, bilevel.query_pairs a step."""
    description: str


def build_bilevel(config: RunConfig, reward_tokenizer: PreTrainedTokenizerBase, rank: int = 0, world_size: int = 1) -> BilevelSetup:
    """A bilevel run's reference policy (config.policy, the inner problem's θ_0), its domains' batches and the steps of
    an epoch. Each of world_size ranks takes a share of every step, so a step needs at least one prompt and pair per rank."""
    bilevel = config.reward.bilevel
    if min(bilevel.support_prompts, bilevel.query_pairs) < world_size:
        raise ConfigError(f"reward.bilevel.support_prompts={bilevel.support_prompts} and query_pairs={bilevel.query_pairs} "
                          f"are split over {world_size} reward-learner ranks: each must be at least the rank count")
    domains = bilevel_domains(config.data, bilevel, config.reward.samples_per_prompt, config.seed, world_size)
    policy_tokenizer = load_tokenizer(config.policy, task_tokenizer(config.data, config.seed))
    policy = build_causal_lm(config.policy, policy_tokenizer, seed=config.seed).to(config.resources.device)
    if bilevel.policy_layers:
        adapt_last_layers(policy, bilevel.policy_layers)
    epoch_steps = max(1, sum(len(d.query) for d in domains) // bilevel.query_pairs)
    return BilevelSetup(BilevelPolicy(policy, bilevel.beta, bilevel.inner_lr, bilevel.difference_step),
                        BilevelBatches(domains, bilevel, config.data, policy_tokenizer, reward_tokenizer, config.seed,
                                       rank, world_size), epoch_steps,
                        describe_domains(domains))
