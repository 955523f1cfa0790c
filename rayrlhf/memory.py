"""Memory: what a process used at its peak (reported per actor and round), and what a learner will need,
estimated from sizes before anything is loaded (rayrlhf/memory_plan.py applies it to a run's actors).

The estimates are arithmetic on the model's shape and the batch; the constants they multiply were measured
with benchmarks/memory.py on SmolLM2-135M (benchmarks/results/memory.md).
"""
import ctypes
import ctypes.util
import functools
import resource
from dataclasses import dataclass
from typing import Optional

GIB = 2**30
GRADIENT_BYTES, ADAM_BYTES, MASTER_BYTES = 4, 8, 4  # per parameter: fp32 gradient, two fp32 Adam moments, fp32 master
ACTIVATION_FACTOR = 0.6
"""Measured bytes kept for backward over the count activation_bytes makes: 0.56-0.74 for a SmolLM2 RM pass of
1-4 pairs at 128-448 tokens (benchmarks/results/memory.md); the larger share is taken with PASS_OVERHEAD_GB."""
PASS_OVERHEAD_GB = 0.3
"""Memory a training pass needs beyond what activation_bytes counts (autograd's buffers, the allocator's slack):
with checkpointing, where activation_bytes is small, a SmolLM2 RM pass still took 0.42 GB."""
LOGIT_COPIES = 3  # logits, their log-softmax and its gradient, float32, at the response positions


@dataclass(frozen=True)
class ModelShape:
    """The sizes memory depends on, read from a model's config (rayrlhf/models/build.py: model_shape)."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    bytes_per_value: int
    """2 for bfloat16 weights and activations, 4 for float32."""
    max_positions: Optional[int] = None
    """The longest sequence (prompt + response tokens) the model's positions cover; None where its config does not say."""


def peak_memory_gb(device: str) -> float:
    """This process's peak: resident set size on CPU (what the node's memory and Ray's out-of-memory monitor
    see), the most ever allocated by torch on the GPU for cuda. In GiB."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def release_free_memory() -> None:
    """Hand the memory a finished phase freed back to the system (glibc's malloc_trim; nothing elsewhere).
    Without it glibc keeps freed activations in its heap, the process stays at its peak for the rest of the run
    and the node's phases add up instead of taking turns (a SmolLM2 RM rank stayed at 5.4 GB evaluating after
    training)."""
    library = ctypes.util.find_library("c")
    if library:
        trim = getattr(ctypes.CDLL(library), "malloc_trim", None)
        if trim is not None:
            trim(0)


def releasing_memory(phase):
    """Decorator for an actor method that is a phase of the round: release_free_memory() when it returns."""
    @functools.wraps(phase)
    def run_phase(*args, **kwargs):
        try:
            return phase(*args, **kwargs)
        finally:
            release_free_memory()

    return run_phase


def weights_bytes(shape: ModelShape) -> int:
    return shape.parameters * shape.bytes_per_value


def optimizer_state_bytes(shape: ModelShape) -> int:
    """What training holds between steps: weights, Adam's two fp32 moments, and DeepSpeed's fp32 master weights
    when the weights are bfloat16."""
    master = MASTER_BYTES if shape.bytes_per_value < 4 else 0
    return shape.parameters * (shape.bytes_per_value + ADAM_BYTES + master)


def gradient_bytes(shape: ModelShape) -> int:
    """fp32 gradients: they exist from a step's first backward to its optimizer step (then freed)."""
    return shape.parameters * GRADIENT_BYTES


def activation_bytes(shape: ModelShape, sequences: int, tokens: int, checkpointing: bool) -> int:
    """What backward keeps of one forward pass over `sequences` x `tokens`: per token and layer about 8 hidden
    plus 4 intermediate values (a Llama block's norms, q/k/v/o, residuals and SwiGLU MLP), and per sequence and
    layer the attention's scores and probabilities (heads x tokens², kept by the masked attention on CPU),
    times the measured ACTIVATION_FACTOR. With checkpointing: each layer's input, and one layer's whole set
    recomputed."""
    per_layer = ((8 * shape.hidden + 4 * shape.intermediate) * tokens + 2 * shape.heads * tokens**2) * shape.bytes_per_value
    kept = shape.layers * shape.hidden * tokens * shape.bytes_per_value + per_layer if checkpointing else shape.layers * per_layer
    return int(ACTIVATION_FACTOR * sequences * kept)


def logits_bytes(shape: ModelShape, sequences: int, response_tokens: int) -> int:
    """The LM head's float32 output at the response positions, with its log-softmax and gradient."""
    return LOGIT_COPIES * sequences * response_tokens * shape.vocab * 4
