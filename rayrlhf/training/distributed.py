"""torch.distributed set-up for DeepSpeed: gloo on CPU, NCCL on GPU, one process per rank."""
import os
import socket
import sys
from typing import Iterable

import torch
import torch.distributed as dist


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
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def average_across_ranks(tensors: Iterable[torch.Tensor]) -> None:
    """In-place mean over the ranks of the default group (a no-op with one rank)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)


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
