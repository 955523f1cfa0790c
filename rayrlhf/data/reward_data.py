"""Everything reward-model training reads, tokenised: train/eval pairs, meta groups, target-domain pairs."""
import logging
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import datasets
from transformers import PreTrainedTokenizerBase

from rayrlhf.config import DataConfig, DataSource
from rayrlhf.data.batches import (PreferenceBatch, ResponseGroupBatch, TokenIds, TokenisedPair, collate_groups, collate_pair_list,
                                  encode_group_rows, encode_pair_rows, rank_shard)
from rayrlhf.data.sources import load_preference_pairs, load_saved_rollouts, response_groups, split_by_prompt
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RewardData:
    train: List[TokenisedPair]
    evaluation: List[TokenisedPair]
    meta: Optional[List[List[TokenIds]]] = None
    target: Optional[List[TokenisedPair]] = None
    dropped: Dict[str, int] = field(default_factory=dict)


def task_tokenizer(data: DataConfig, seed: int) -> Optional[PreTrainedTokenizerBase]:
    """The synthetic task's own tokenizer (for `tiny` models), or None for file-based data."""
    if data.preference.format == "synthetic":
        return SyntheticPreferenceTask(data.synthetic, seed).tokenizer()
    return None


def prepare_reward_data(
    data: DataConfig, tokenizer: PreTrainedTokenizerBase, samples_per_prompt: int, need_meta: bool, seed: int
) -> RewardData:
    """Load, split by prompt id, build meta groups (k responses per prompt) and tokenise."""
    loaded = load_preference_pairs(data.preference, data.synthetic, seed)
    if loaded.dropped:
        log.warning("dropped pairs from %s: %s", data.preference.path or "synthetic", loaded.dropped)
    train, evaluation = split_by_prompt(loaded.pairs, data.eval_fraction, seed)

    def pairs_of(table: datasets.Dataset) -> List[TokenisedPair]:
        return encode_pair_rows(tokenizer, table, data.max_prompt_tokens, data.max_response_tokens)

    synthetic = SyntheticPreferenceTask(data.synthetic, seed) if data.preference.format == "synthetic" else None
    result = RewardData(train=pairs_of(train), evaluation=pairs_of(evaluation), dropped=loaded.dropped)
    if need_meta:
        groups = _meta_groups(data.meta, synthetic, data, samples_per_prompt, seed)
        result.meta = encode_group_rows(tokenizer, groups, data.max_prompt_tokens, data.max_response_tokens)
    if data.target_eval is not None:
        result.target = pairs_of(load_preference_pairs(data.target_eval, data.synthetic, seed).pairs)
    elif synthetic is not None:
        result.target = pairs_of(synthetic.drifted_pairs())
    return result


def _meta_groups(meta: Optional[DataSource], synthetic, data: DataConfig, k: int, seed: int) -> datasets.Dataset:
    if meta is not None and meta.format == "rollouts":
        return load_saved_rollouts(meta, k)
    if meta is not None:
        return response_groups(load_preference_pairs(meta, data.synthetic, seed).pairs, k)
    if synthetic is not None:
        return synthetic.drifted_response_groups(k)
    raise ConfigError(
        "reward.method='metarm' needs meta data: set data.meta to a source of responses grouped by prompt "
        "(e.g. the target domain), or use the synthetic task; the Ray loop samples it from the policy instead"
    )


def preference_batches(
    pairs: List[TokenisedPair], batch_size: int, pad_id: int, rank: int, world_size: int, shuffle_seed: Optional[int]
) -> Iterator[PreferenceBatch]:
    """Global batches of `batch_size` pairs (the last partial one dropped when shuffling for training),
    each reduced to this rank's share."""
    order = list(range(len(pairs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    stop = len(order) - len(order) % batch_size if shuffle_seed is not None else len(order)
    for start in range(0, stop, batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        yield collate_pair_list(rank_shard(chunk, rank, world_size), pad_id)


def group_batches(
    groups: List[List[TokenIds]], batch_size: int, pad_id: int, rank: int, world_size: int, seed: int
) -> Iterator[ResponseGroupBatch]:
    """Endless meta batches of `batch_size` prompts (k responses each), reshuffled each pass, this rank's share."""
    if len(groups) < batch_size:
        raise ConfigError(f"reward.meta_batch_size={batch_size} exceeds the {len(groups)} meta prompts available")
    rng = random.Random(seed)
    while True:
        order = list(range(len(groups)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [groups[i] for i in order[start : start + batch_size]]
            yield collate_groups(rank_shard(chunk, rank, world_size), pad_id)
