"""Nothing non-finite is written as a model or a checkpoint: the check every writer calls first."""
from typing import Iterable, Tuple

import torch

from rayrlhf.errors import TrainingDivergedError


def require_finite_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], where: str) -> None:
    """TrainingDivergedError naming the first few floating-point tensors with a NaN or an infinity."""
    bad = [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise TrainingDivergedError(f"{where}: non-finite values in {', '.join(bad[:3])}{more}; nothing was written")
