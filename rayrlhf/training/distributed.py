"""torch.distributed set-up for DeepSpeed: gloo on CPU, NCCL on GPU, one process per rank."""
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, List

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
STALE_BUILD_LOCK_S = 600  # DeepSpeed's shm op builds in about a minute; a lock this old has no builder left


def remove_stale_build_locks(extensions_dir: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> List[Path]:
    """Delete torch-extension build locks older than max_age_s under extensions_dir; return them.

    A process killed while building an op (DeepSpeed's CPU shm comm op, built at first init) leaves its
    `lock` file, and every later build waits on it forever without a word.
    """
    now = time.time()
    removed = []
    for lock in [*extensions_dir.glob("*/lock"), *extensions_dir.glob("*/*/lock")]:
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # its build finished meanwhile
            continue
        if age > max_age_s:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            logger.warning("removed a stale torch-extension build lock left by a killed build: %s", lock)
    return removed


def torch_extensions_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed(device: str, rank: int = 0, world_size: int = 1, master_port: int = 0, master_addr: str = "") -> None:
    """Join (or form) the process group. DeepSpeed needs the env variables set, else it tries MPI discovery.

    Under torchrun the variables are already set and kept. A Ray actor passes master_addr and master_port
    explicitly (its rank 0's address), which override them. A single process gets a fresh loopback port of
    its own, so several runs on one machine do not collide.
    """
    if dist.is_initialized():
        return
    import deepspeed

    if master_addr:
        # A Ray actor sees only the GPU it was given, as device 0, so its local rank on GPU is 0.
        local_rank = 0 if device == "cuda" else rank
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port or free_port()))
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    if device == "cpu":
        remove_stale_build_locks(torch_extensions_dir())
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def world_size() -> int:
    """Ranks in this process's group (1 outside one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_across_ranks(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the ranks, in place (nothing to do on one rank)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def average_across_ranks(tensors: Iterable[torch.Tensor]) -> None:
    """In-place mean over the ranks of the default group (a no-op with one rank)."""
    ranks = world_size()
    if ranks == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ranks)


def teardown_distributed() -> None:
    """Wait for every rank, then end the process group (for processes that live on, e.g. Ray actors)."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def exit_distributed_process() -> None:
    """End a command-line rank's process group at the end of its work.

    With several gloo ranks on CPU, interpreter teardown after DeepSpeed's shared-memory comm op has run
    sometimes aborts ("terminate called without an active exception", seen in CI after all work was done).
    So a rank of a multi-rank group leaves with os._exit once its output is flushed; one rank tears down normally.
    """
    if not dist.is_initialized():
        return
    if dist.get_world_size() == 1:
        dist.destroy_process_group()
        return
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
