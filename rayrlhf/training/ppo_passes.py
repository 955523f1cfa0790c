"""The PPO learner's model passes: its DeepSpeed engines, log-probs of the response tokens, the critic's values
(and its last-token features, group invariant learning's input), and no-gradient passes in micro-batches."""
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from rayrlhf.algos.ppo import gather_log_probs
from rayrlhf.data.batches import micro_batch_slices
from rayrlhf.data.rollouts import SequenceBatch
from rayrlhf.models.heads import token_values, token_values_and_last_hidden
from rayrlhf.training.engines import deepspeed_config


def build_engine(model: nn.Module, lr: float, micro_batch_size: int, zero_stage: int, max_grad_norm: float,
                 group_head_lr: Optional[float] = None):
    """A DeepSpeed engine over `model` with AdamW at `lr`; a critic's group head (group invariant learning) at
    group_head_lr, since its objective starts at a saddle (equal groups) that it must leave quickly."""
    import deepspeed

    from rayrlhf.training.safe_checkpoints import use_safetensors_checkpoints

    bf16 = next(model.parameters()).dtype == torch.bfloat16
    head = getattr(model, "group_head", None)
    groups = [{"params": list(model.parameters())}]
    if head is not None and group_head_lr is not None:
        in_head = {id(p) for p in head.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in in_head]},
                  {"params": list(head.parameters()), "lr": group_head_lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, fused=True)  # one kernel per update
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(micro_batch_size, zero_stage, bf16, max_grad_norm))
    use_safetensors_checkpoints(engine)
    return engine


def response_log_probs(model: nn.Module, batch: SequenceBatch, with_entropy: bool = True):
    """(log π(response tokens), entropy or None), both (B, R), from one forward pass over prompt+response.

    The LM head runs only from the first position that predicts a response token on (transformers'
    logits_to_keep): the (B, L, V) logits of the prompts are never formed.
    """
    first = int(batch.response_positions.min())
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                   logits_to_keep=batch.input_ids.shape[1] - first).logits  # (B, L - first, V)
    positions = (batch.response_positions - first).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    at_responses = logits.gather(1, positions)  # (B, R, V)
    return gather_log_probs(at_responses, batch.response_tokens, with_entropy)


def sequence_log_probs(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """log π(response | prompt) of each row, the sum over its response tokens in float64: (B,)."""
    token_log_probs, _ = response_log_probs(model, batch, with_entropy=False)  # (B, R)
    return (token_log_probs.double() * batch.response_mask).sum(dim=1)


def response_values(critic: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """V(s_t) for the state before each response token: (B, R)."""
    values = token_values(critic, batch.input_ids, batch.attention_mask)  # (B, L)
    return values.gather(1, batch.response_positions)


def response_values_and_features(critic: nn.Module, batch: SequenceBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """response_values and the critic's hidden state at each row's last token, from one pass: ((B, R), (B, H))."""
    values, features = token_values_and_last_hidden(critic, batch.input_ids, batch.attention_mask)
    return values.gather(1, batch.response_positions), features


def forward_in_micro_batches(forward: Callable[[SequenceBatch], torch.Tensor], batch: SequenceBatch,
                             size: Optional[int]) -> Tuple[torch.Tensor, ...]:
    """forward() of every micro-batch of at most `size` rows, its outputs (each (b, R)) concatenated to (B, R)."""
    outputs = [forward(batch.part(rows)) for rows in micro_batch_slices(len(batch), size)]
    outputs = [output if isinstance(output, tuple) else (output,) for output in outputs]
    return tuple(torch.cat(parts) for parts in zip(*outputs))
