"""Weight sync, the driver's side: the policy from the PPO trainer's rank 0 into every rollout worker after each
update. WeightSync owns the transport, the broadcast group's set-up, the weights' version number and the re-sync
of a restarted worker; the buckets themselves are rayrlhf/training/weight_buckets.py.

Three transports (rollout.weight_sync):

- `object_store`: rank 0 puts each bucket into Ray's object store and the driver hands the references on.
  Workers on rank 0's node read the buckets from shared memory without a copy; other nodes get them over Ray's
  object transfer. Works for every engine and device.
- `broadcast`: rank 0 and the workers form a process group of their own (NCCL where everyone has a GPU,
  gloo on CPU) and rank 0 broadcasts the buckets; on GPUs the bytes go device to device, never through host
  memory. NCCL needs each member on a different GPU: with the trainer and the workers sharing one GPU, use
  `object_store` or `cuda_ipc`.
- `cuda_ipc`: for actors sharing one GPU. Rank 0 packs the buckets on the GPU and hands out CUDA IPC handles;
  each worker opens them in its own process and copies device to device. Nothing leaves the GPU.
"""
import time
from typing import List

import ray

WORKER_RESTART_TIMEOUT_S = 600  # a restarted worker rebuilds its engine (vLLM: tens of seconds on a CPU)


class WeightSync:
    """Pushes rank 0's policy into the rollout workers; the driver handles references only."""

    def __init__(self, trainer, workers: List, transport: str, bucket_mb: float):
        self.trainer = trainer  # the PPOTrainer of rank 0 (a Ray handle)
        self.workers = workers  # RolloutWorker handles
        self.transport = transport
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.version = 0  # of the weights the workers hold: each push adds one
        self.plan = None  # the broadcast's bucket layout, once its group is formed

    def push(self) -> None:
        """The current policy into every worker, as the next version."""
        self.version += 1
        trainer, workers = self.trainer, self.workers
        if self.transport == "object_store":
            buckets = trainer.policy_to_object_store.remote(self.bucket_bytes)  # resolved in each worker, not here
            ray.get([w.load_weight_buckets.remote(buckets, self.version) for w in workers])
            return
        if self.transport == "cuda_ipc":
            handles = trainer.policy_on_gpu.remote(self.bucket_bytes)
            ray.get([w.load_shared_buckets.remote(handles, self.version) for w in workers])
            return
        if self.plan is None:  # first push: form the group, agree on the bucket layout
            address, port = ray.get(trainer.rendezvous_address.remote())
            members = 1 + len(workers)
            ray.get([trainer.join_weight_group.remote(address, port, members)]
                    + [w.join_weight_group.remote(address, port, index + 1, members) for index, w in enumerate(workers)])
            self.plan = ray.get(trainer.policy_bucket_plan.remote(self.bucket_bytes))
        ray.get([trainer.broadcast_policy.remote(self.plan)]
                + [w.receive_policy.remote(self.plan, self.version) for w in workers])

    def resync(self, worker) -> None:
        """The current policy into a worker Ray restarted (through the object store, whatever the transport: a
        broadcast group lost a member and is formed again at the next push)."""
        deadline = time.monotonic() + WORKER_RESTART_TIMEOUT_S
        while True:  # calls fail with ActorUnavailableError until Ray has restarted it
            try:
                ray.get(worker.ready.remote())
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        buckets = self.trainer.policy_to_object_store.remote(self.bucket_bytes)
        ray.get(worker.load_weight_buckets.remote(buckets, self.version))
        self.plan = None
