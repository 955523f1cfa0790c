"""What rollout workers return and what the PPO trainer trains on: typed batches passed through the object store."""
from dataclasses import dataclass
from typing import List, Sequence

import torch

from rayrlhf.data.batches import TokenIds, trim_right_padding


@dataclass
class Rollout:
    """The policy's responses, `group_size` per prompt, prompt-major: row i answers prompt_texts[i]
    (each prompt repeated group_size times). log_probs are the engine's, per response token."""

    prompt_texts: List[str]
    prompt_ids: List[TokenIds]
    response_ids: List[TokenIds]
    response_texts: List[str]
    log_probs: List[List[float]]
    group_size: int

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.response_ids)

    def rows(self, start: int, stop: int) -> "Rollout":
        return Rollout(self.prompt_texts[start:stop], self.prompt_ids[start:stop], self.response_ids[start:stop],
                       self.response_texts[start:stop], self.log_probs[start:stop], self.group_size)

    @staticmethod
    def concatenate(parts: Sequence["Rollout"]) -> "Rollout":
        return Rollout(
            [t for p in parts for t in p.prompt_texts], [t for p in parts for t in p.prompt_ids],
            [t for p in parts for t in p.response_ids], [t for p in parts for t in p.response_texts],
            [t for p in parts for t in p.log_probs], parts[0].group_size,
        )


@dataclass
class SequenceBatch:
    """B prompt+response sequences, right-padded to (B, L), with the response read out as (B, R):
    response token k of row i is input_ids[i, prompt_len_i + k], predicted by the logits at
    response_positions[i, k] = prompt_len_i + k - 1. response_mask is 1 on real response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_tokens: torch.Tensor
    response_positions: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_tokens,
                                                       self.response_positions, self.response_mask)))

    def select(self, rows: torch.Tensor) -> "SequenceBatch":
        return SequenceBatch(*(t[rows] for t in (self.input_ids, self.attention_mask, self.response_tokens,
                                                  self.response_positions, self.response_mask)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def part(self, rows: slice) -> "SequenceBatch":
        """Rows `rows` as a micro-batch, without the padding columns that only longer rows needed (every
        response position lies inside its own row's sequence, so none is cut)."""
        input_ids, attention_mask = trim_right_padding(self.input_ids[rows], self.attention_mask[rows])
        return SequenceBatch(input_ids, attention_mask, self.response_tokens[rows], self.response_positions[rows],
                             self.response_mask[rows])


def collate_sequences(prompt_ids: Sequence[TokenIds], response_ids: Sequence[TokenIds], pad_id: int) -> SequenceBatch:
    """Build a SequenceBatch; every response must have at least one token."""
    longest = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    longest_response = max(len(r) for r in response_ids)
    rows = len(prompt_ids)
    input_ids = torch.full((rows, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, longest), dtype=torch.long)
    response_tokens = torch.full((rows, longest_response), pad_id, dtype=torch.long)
    response_positions = torch.zeros((rows, longest_response), dtype=torch.long)
    response_mask = torch.zeros((rows, longest_response), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if not response:
            raise ValueError(f"row {row} has an empty response")
        sequence = list(prompt) + list(response)
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        response_tokens[row, : len(response)] = torch.tensor(response)
        response_mask[row, : len(response)] = 1
        # Padding positions point at the last real position: harmless, masked out.
        response_positions[row] = (len(prompt) - 1 + torch.arange(longest_response)).clamp(max=len(sequence) - 1)
    return SequenceBatch(input_ids, attention_mask, response_tokens, response_positions, response_mask)
