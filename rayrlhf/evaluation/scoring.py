"""A reward model's scores of (prompt, response) texts, and its accuracy on preference pairs, in one process."""
from typing import List, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rayrlhf.data.batches import encode_prompt_response, pad_right
from rayrlhf.models.heads import reward_scores


@torch.no_grad()
def score_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    responses: Sequence[str], *, max_prompt_tokens: int, max_response_tokens: int,
                    batch_size: int = 32) -> torch.Tensor:
    """r(x, y) for each (prompt, response), tokenised and truncated as the RM was trained. Returns (N,) on CPU."""
    sequences = [encode_prompt_response(tokenizer, prompt, response, max_prompt_tokens, max_response_tokens)
                 for prompt, response in zip(prompts, responses)]
    model.eval()
    device = next(model.parameters()).device
    scores: List[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[start:start + batch_size], tokenizer.pad_token_id)
        scores.append(reward_scores(model, ids.to(device), mask.to(device)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs the RM orders as labelled: mean(r(x, y_w) > r(x, y_l)) (a tie counts as wrong). (N,), (N,)."""
    return (chosen_scores > rejected_scores).double().mean().item()
