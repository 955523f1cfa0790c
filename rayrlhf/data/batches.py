"""Tokenisation with truncation that never cuts the response away, and padded batches for the RM."""
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedTokenizerBase

TokenIds = List[int]
TokenisedPair = Tuple[TokenIds, TokenIds]  # (chosen, rejected)


def end_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes a response: eos, or [SEP] for BERT-style encoders."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither an eos nor a sep token")
    return token


def encode_prompt_and_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int
) -> Tuple[TokenIds, TokenIds]:
    """(prompt ids, response ids + end token), apart (a policy's log-probabilities need to know where the response
    starts).

    The prompt keeps its LAST max_prompt_tokens tokens (the instruction, e.g. "TL;DR:", sits at its end);
    the response keeps its first max_response_tokens - 1 tokens and always ends with the end token, so a
    long prompt can never push the response out of the sequence.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][: max_response_tokens - 1]
    return prompt_ids, response_ids + [end_token_id(tokenizer)]


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int
) -> TokenIds:
    """prompt ids + response ids + end token, as one sequence (encode_prompt_and_response)."""
    prompt_ids, response_ids = encode_prompt_and_response(tokenizer, prompt, response, max_prompt_tokens, max_response_tokens)
    return prompt_ids + response_ids


def encode_pair_rows(
    tokenizer: PreTrainedTokenizerBase, rows: Iterable[dict], max_prompt_tokens: int, max_response_tokens: int
) -> List[TokenisedPair]:
    """Rows with prompt/chosen/rejected fields as (chosen ids, rejected ids), each prompt + response + end."""
    def encode(prompt: str, response: str) -> TokenIds:
        return encode_prompt_response(tokenizer, prompt, response, max_prompt_tokens, max_response_tokens)

    return [(encode(row["prompt"], row["chosen"]), encode(row["prompt"], row["rejected"])) for row in rows]


def encode_group_rows(
    tokenizer: PreTrainedTokenizerBase, groups: Iterable[dict], max_prompt_tokens: int, max_response_tokens: int
) -> List[List[TokenIds]]:
    """Rows with prompt/responses fields (k responses to one prompt) as k prompt + response + end sequences."""
    return [[encode_prompt_response(tokenizer, group["prompt"], text, max_prompt_tokens, max_response_tokens)
             for text in group["responses"]] for group in groups]


@dataclass
class PreferenceBatch:
    """B pairs as one (2B, T) tensor: rows [0, B) are the chosen responses, rows [B, 2B) the rejected."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PreferenceBatch":
        return PreferenceBatch(self.input_ids.to(device), self.attention_mask.to(device))


@dataclass
class ResponseGroupBatch:
    """P prompts with k responses each as one (P·k, T) tensor, row p·k + i the i-th response to prompt p."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    group_size: int

    @property
    def num_prompts(self) -> int:
        return self.input_ids.shape[0] // self.group_size

    def to(self, device) -> "ResponseGroupBatch":
        return ResponseGroupBatch(self.input_ids.to(device), self.attention_mask.to(device), self.group_size)


def pad_right(sequences: Sequence[TokenIds], pad_id: int):
    """(ids, mask), both (N, longest), padded on the right."""
    longest = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def collate_pair_list(pairs: Sequence[TokenisedPair], pad_id: int) -> PreferenceBatch:
    return collate_pairs([chosen for chosen, _ in pairs], [rejected for _, rejected in pairs], pad_id)


def collate_pairs(chosen: Sequence[TokenIds], rejected: Sequence[TokenIds], pad_id: int) -> PreferenceBatch:
    ids, mask = pad_right(list(chosen) + list(rejected), pad_id)
    return PreferenceBatch(ids, mask)


def collate_groups(groups: Sequence[Sequence[TokenIds]], pad_id: int) -> ResponseGroupBatch:
    sizes = {len(group) for group in groups}
    if len(sizes) != 1:
        raise ValueError(f"every prompt needs the same number of responses, got sizes {sorted(sizes)}")
    ids, mask = pad_right([sequence for group in groups for sequence in group], pad_id)
    return ResponseGroupBatch(ids, mask, sizes.pop())


def micro_batch_slices(count: int, size: Optional[int]) -> List[slice]:
    """Consecutive slices of at most `size` items covering range(count); size None: one slice of all."""
    size = count if size is None else max(1, size)
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def trim_right_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Drop the columns past the longest row (right padding): a micro-batch of short rows computes on no
    padding that only a longer row of its global batch needed. (N, T) -> (N, T' <= T), both."""
    longest = int(attention_mask.sum(dim=1).max().item()) if attention_mask.numel() else 0
    return input_ids[:, :longest], attention_mask[:, :longest]


def pair_micro_batches(batch: PreferenceBatch, pairs_per_micro_batch: Optional[int]) -> List[PreferenceBatch]:
    """The batch as micro-batches of at most that many pairs (chosen rows first, as in PreferenceBatch)."""
    count = batch.num_pairs
    parts = []
    for part in micro_batch_slices(count, pairs_per_micro_batch):
        rows = torch.cat([torch.arange(count)[part], torch.arange(count, 2 * count)[part]])
        parts.append(PreferenceBatch(*trim_right_padding(batch.input_ids[rows], batch.attention_mask[rows])))
    return parts


def group_micro_batches(batch: ResponseGroupBatch, prompts_per_micro_batch: Optional[int]) -> List[ResponseGroupBatch]:
    """The batch as micro-batches of at most that many prompts, each with all k of its responses."""
    k = batch.group_size
    parts = []
    for part in micro_batch_slices(batch.num_prompts, prompts_per_micro_batch):
        rows = slice(part.start * k, part.stop * k)
        parts.append(ResponseGroupBatch(*trim_right_padding(batch.input_ids[rows], batch.attention_mask[rows]), k))
    return parts


def rank_shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's contiguous, equal share of a global batch (sizes are validated divisible up front)."""
    share = len(items) // world_size
    return list(items[rank * share : (rank + 1) * share])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int) -> List[TokenIds]:
    """Prompt token ids for generation, keeping each prompt's last max_prompt_tokens (as encode_prompt_response)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
