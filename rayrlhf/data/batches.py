"""Tokenisation with truncation that never cuts the response away, and padded batches for the RM."""
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

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


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int
) -> TokenIds:
    """prompt ids + response ids + end token.

    The prompt keeps its LAST max_prompt_tokens tokens (the instruction, e.g. "TL;DR:", sits at its end);
    the response keeps its first max_response_tokens - 1 tokens and always ends with the end token, so a
    long prompt can never push the response out of the sequence.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][: max_response_tokens - 1]
    return prompt_ids + response_ids + [end_token_id(tokenizer)]


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


@dataclass
class ResponseGroupBatch:
    """P prompts with k responses each as one (P·k, T) tensor, row p·k + i the i-th response to prompt p."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    group_size: int


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


def rank_shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's contiguous, equal share of a global batch (sizes are validated divisible up front)."""
    share = len(items) // world_size
    return list(items[rank * share : (rank + 1) * share])


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int) -> List[TokenIds]:
    """Prompt token ids for generation, keeping each prompt's last max_prompt_tokens (as encode_prompt_response)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
