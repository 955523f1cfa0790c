"""Meta-training of a reward model by bilevel reward learning (reward.method bilevel, `python -m rayrlhf.train_rm`).

Each step takes the next domain (every domain in turn, in an order reshuffled each pass), draws
bilevel.support_prompts of its response groups and bilevel.query_pairs of its labelled pairs, tokenises them
for the policy and for the RM, asks the policy side (BilevelPolicy) for each response's weight and steps the RM
on the weighted rewards (RewardModelTrainer.weighted_reward_step).
"""
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
from transformers import PreTrainedTokenizerBase

from rayrlhf.config import BilevelConfig, DataConfig
from rayrlhf.data.batches import PreferenceBatch, ResponseGroupBatch, collate_groups, collate_pairs, encode_prompt_and_response
from rayrlhf.data.domains import Domain
from rayrlhf.data.rollouts import SequenceBatch, collate_sequences
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


class BilevelBatches:
    """Endless BilevelBatch-es over the domains, seeded."""

    def __init__(self, domains: List[Domain], bilevel: BilevelConfig, data: DataConfig,
                 policy_tokenizer: PreTrainedTokenizerBase, reward_tokenizer: PreTrainedTokenizerBase, seed: int):
        self.domains, self.bilevel, self.data = domains, bilevel, data
        self.policy_tokenizer, self.reward_tokenizer = policy_tokenizer, reward_tokenizer
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[BilevelBatch]:
        while True:
            order = list(self.domains)
            self.rng.shuffle(order)
            for domain in order:
                yield self.batch(domain)

    def batch(self, domain: Domain) -> BilevelBatch:
        groups = self.rng.sample(domain.support, min(self.bilevel.support_prompts, len(domain.support)))
        pairs = self.rng.sample(domain.query, min(self.bilevel.query_pairs, len(domain.query)))
        rows = [(group["prompt"], response) for group in groups for response in group["responses"]]
        samples = self._policy_sequences(rows)
        prompt_index = torch.arange(len(groups)).repeat_interleave(len(groups[0]["responses"]))
        chosen = self._policy_sequences([(pair["prompt"], pair["chosen"]) for pair in pairs])
        rejected = self._policy_sequences([(pair["prompt"], pair["rejected"]) for pair in pairs])
        reward_rows = [[self._reward_ids(group["prompt"], response) for response in group["responses"]] for group in groups]
        pad = self.reward_tokenizer.pad_token_id
        reward_pairs = collate_pairs([self._reward_ids(p["prompt"], p["chosen"]) for p in pairs],
                                     [self._reward_ids(p["prompt"], p["rejected"]) for p in pairs], pad)
        return BilevelBatch(domain.name, samples, prompt_index, chosen, rejected, collate_groups(reward_rows, pad), reward_pairs)

    def _policy_sequences(self, rows) -> SequenceBatch:
        encoded = [encode_prompt_and_response(self.policy_tokenizer, prompt, response, self.data.max_prompt_tokens,
                                              self.data.max_response_tokens) for prompt, response in rows]
        return collate_sequences([p for p, _ in encoded], [r for _, r in encoded], self.policy_tokenizer.pad_token_id)

    def _reward_ids(self, prompt: str, response: str):
        prompt_ids, response_ids = encode_prompt_and_response(self.reward_tokenizer, prompt, response,
                                                              self.data.max_prompt_tokens, self.data.max_response_tokens)
        return prompt_ids + response_ids


def bilevel_step(trainer: RewardModelTrainer, policy: BilevelPolicy, batch: BilevelBatch, vanilla_weight: float) -> Dict[str, float]:
    """One outer step: the RM scores the support responses, the policy side weighs them, the RM steps."""
    scores = trainer.group_rewards([batch.reward_samples]).reshape(-1)
    weights, policy_values = policy.sample_weights(batch.samples, batch.prompt_index, scores, batch.chosen, batch.rejected)
    values = trainer.weighted_reward_step(batch.reward_samples, weights, batch.reward_pairs, vanilla_weight)
    return {**values, **policy_values, "weight_norm": weights.norm().item()}


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
