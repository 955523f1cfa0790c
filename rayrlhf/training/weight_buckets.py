"""The policy's tensors as flat byte buckets, and the three ways they travel (no Ray here: the driver-side
weight sync that uses them is rayrlhf/actors/weight_sync.py).

Rank 0 of the PPO trainer lays the policy's tensors (tied ones once) end to end in flat byte buckets of about
rollout.weight_sync_bucket_mb; a worker reads each bucket's tensors as views and copies them into its engine.
"""
import datetime
import warnings
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

ALIGNMENT = 16  # bytes: every tensor starts aligned, so a view of the bucket can take any dtype
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lies in its bucket."""

    name: str
    shape: tuple
    dtype: torch.dtype
    offset: int  # bytes from the bucket's start
    nbytes: int


def distinct_tensors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (e.g. lm_head sharing embed_tokens' storage):
    engines tie them again themselves, and sending them twice doubles the bytes."""
    distinct, seen = {}, set()
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            distinct[name] = tensor
    return distinct


def plan_buckets(tensors: Dict[str, torch.Tensor], bucket_bytes: int) -> List[List[TensorSlot]]:
    """Tensors in order, packed into buckets of at most `bucket_bytes` (a larger tensor gets a bucket alone)."""
    buckets: List[List[TensorSlot]] = [[]]
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if buckets[-1] and offset + nbytes > bucket_bytes:
            buckets.append([])
            offset = 0
        buckets[-1].append(TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset, nbytes))
        offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
    return [bucket for bucket in buckets if bucket]


def bucket_size(bucket: List[TensorSlot]) -> int:
    return bucket[-1].offset + bucket[-1].nbytes


def pack_bucket(tensors: Dict[str, torch.Tensor], bucket: List[TensorSlot]) -> torch.Tensor:
    """One flat uint8 tensor (on the tensors' device) holding the bucket's tensors at their offsets."""
    flat = torch.zeros(bucket_size(bucket), dtype=torch.uint8, device=tensors[bucket[0].name].device)
    for slot in bucket:
        flat[slot.offset:slot.offset + slot.nbytes] = tensors[slot.name].detach().contiguous().reshape(-1).view(torch.uint8)
    return flat


def unpack_bucket(flat: torch.Tensor, bucket: List[TensorSlot]) -> Dict[str, torch.Tensor]:
    """The bucket's tensors as views of `flat` (no copy)."""
    return {slot.name: flat[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape) for slot in bucket}


def bucket_from_object_store(array) -> torch.Tensor:
    """A uint8 tensor over a bucket read from the object store: a read-only numpy view of shared memory, which
    is only read from (copied into the engine), so torch's warning about writing to it does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def share_on_gpu(flat: torch.Tensor) -> tuple:
    """A picklable CUDA IPC handle of a GPU tensor; the tensor must stay alive until every reader is done."""
    return reduce_tensor(flat)


def open_shared(handle: tuple) -> torch.Tensor:
    """The GPU tensor behind a handle from `share_on_gpu`, opened in this process (same GPU, no copy)."""
    rebuild, arguments = handle
    return rebuild(*arguments)


class BroadcastGroup:
    """A process group of rank 0 of the PPO trainer (member 0) and the rollout workers (members 1..N), apart
    from the trainer's own DeepSpeed group: NCCL on CUDA, gloo on CPU."""

    def __init__(self, address: str, port: int, member: int, members: int, device: str):
        store = dist.TCPStore(address, port, members, is_master=member == 0, timeout=GROUP_TIMEOUT)
        if device == "cuda":
            self.group = dist.ProcessGroupNCCL(store, member, members)
        else:
            self.group = dist.ProcessGroupGloo(store, member, members, GROUP_TIMEOUT)
        self.device = device

    def broadcast(self, flat: torch.Tensor) -> torch.Tensor:
        """Member 0's `flat` into every member's `flat` (same size), in place."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([flat], options).wait()
        return flat

    def send(self, tensors: Dict[str, torch.Tensor], plan: List[List[TensorSlot]]) -> None:
        for bucket in plan:
            self.broadcast(pack_bucket(tensors, bucket))

    def receive(self, plan: List[List[TensorSlot]]) -> Dict[str, torch.Tensor]:
        received = {}
        for bucket in plan:
            flat = torch.empty(bucket_size(bucket), dtype=torch.uint8, device=self.device)
            received.update(unpack_bucket(self.broadcast(flat), bucket))
        return received
