"""Loss checks every rank of a learner takes together before its optimizer step: all ranks stop at the same step
instead of one waiting forever in a collective the others left, and no parameter takes a non-finite step."""
import math
from typing import Dict

import torch
import torch.distributed as dist

from rayrlhf.errors import TrainingDivergedError


def require_finite_losses(values: Dict[str, float], where: str) -> None:
    """TrainingDivergedError naming each non-finite value of `values` (losses of the step about to be taken), on
    every rank when any rank has one. Call it before the optimizer step, so the parameters stay as they were."""
    bad = {name: value for name, value in values.items() if value is not None and not math.isfinite(value)}
    if _any_rank(bool(bad)):
        named = ", ".join(f"{name} = {value}" for name, value in bad.items()) or "a non-finite loss on another rank"
        raise TrainingDivergedError(f"{where}: {named}; the step was not taken (is a learning rate too high?)")


def _any_rank(flag: bool) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    total = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return bool(total.item())
