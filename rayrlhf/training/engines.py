"""What both learners need of a DeepSpeed engine: its config, and gradients accumulated over micro-batches.

A global batch (what the algorithm sees) is split over ranks, and each rank's share into micro-batches (what
one forward pass holds). Each micro-batch's loss is weighted by its share of the rank's batch, so the summed
gradient is the gradient of the whole share's loss; DeepSpeed reduces it over ranks once, at the last
micro-batch (its accumulation boundary), and one optimizer step follows.
"""
from typing import Callable

import torch


def deepspeed_config(micro_batch_size: int, zero_stage: int, bf16: bool, max_grad_norm: float) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        # Accumulation is driven by accumulate_gradients (the boundary set per micro-batch), not by a count.
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "bf16": {"enabled": bf16},
        # Gather every ZeRO-3 parameter from its partition on use (no persistent copies), so the
        # meta step's change to the partition is what the next forward pass sees.
        "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def enable_gradient_checkpointing(model) -> None:
    """transformers' activation checkpointing, the non-reentrant form (it works with inputs that need no
    gradient). Active in train mode only. Not for MetaRM's second-order step (reward_trainer refuses it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def accumulate_gradients(engine, count: int, weighted_loss: Callable[[int], torch.Tensor]) -> None:
    """Backward of `weighted_loss(i)` for micro-batches i = 0..count-1, gradients summed in the engine; the
    ranks' gradients are reduced once, after the last. The caller then steps (or reads the gradients).

    weighted_loss(i) is computed just before its backward, so one micro-batch's graph is alive at a time.
    """
    for index in range(count):
        engine.set_gradient_accumulation_boundary(index == count - 1)
        engine.backward(weighted_loss(index), scale_wrt_gas=False)
