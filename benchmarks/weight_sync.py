"""One weight sync through Ray, as the pipeline does it, beside copying the same bytes in memory: a sender actor
holding the policy (as the PPO trainer's rank 0) and receiver actors holding the transformers engine (as
rollout workers), for both transports of rayrlhf/training/weight_buckets.py and a few bucket sizes.

    .venv/bin/python benchmarks/weight_sync.py [--model smollm2|smollm2-random] [--device cpu|cuda] [--workers 2]

`smollm2-random` is SmolLM2-135M's architecture with random weights (no model file needed). On one GPU the
broadcast transport cannot run (NCCL needs a GPU per member) and is left out.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rollout import smollm2_random  # noqa: E402

from rayrlhf.training.weight_buckets import (BroadcastGroup, bucket_from_object_store, distinct_tensors,  # noqa: E402
                                        open_shared, pack_bucket, plan_buckets, share_on_gpu, unpack_bucket)
from rayrlhf.engines.generation import TransformersEngine  # noqa: E402
from rayrlhf.training.distributed import free_port  # noqa: E402


def build_policy(model: str, device: str):
    if model == "smollm2-random":
        return smollm2_random(torch.float32 if device == "cpu" else torch.bfloat16).to(device)
    from rayrlhf.config import ModelSpec
    from rayrlhf.models.build import build_causal_lm, load_tokenizer

    spec = ModelSpec(source=model)
    return build_causal_lm(spec, load_tokenizer(spec)).to(device)


class Sender:
    def __init__(self, model: str, device: str, threads: int):
        torch.set_num_threads(threads)
        self.device, self.tensors = device, distinct_tensors(build_policy(model, device).state_dict())
        for tensor in self.tensors.values():  # unlike the receivers' copies: the checksums show the sync arrived
            tensor.add_(0.5)

    def size(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_object_store(self, bucket_bytes: int):
        return [ray.put((bucket, pack_bucket(self.tensors, bucket).cpu().numpy()))
                for bucket in plan_buckets(self.tensors, bucket_bytes)]

    def on_gpu(self, bucket_bytes: int):
        self.shared = [(bucket, pack_bucket(self.tensors, bucket)) for bucket in plan_buckets(self.tensors, bucket_bytes)]
        return [(bucket, share_on_gpu(flat)) for bucket, flat in self.shared]

    def join(self, port: int, members: int):
        self.group = BroadcastGroup("127.0.0.1", port, 0, members, self.device)

    def broadcast(self, bucket_bytes: int):
        self.group.send(self.tensors, plan_buckets(self.tensors, bucket_bytes))

    def checksum(self) -> float:
        return sum(t.double().sum().item() for t in self.tensors.values())

    def plan(self, bucket_bytes: int):
        return plan_buckets(self.tensors, bucket_bytes)

    def memory_copy_seconds(self) -> float:
        """Copying every tensor once on this actor's device: the floor a sync is compared with."""
        for _ in range(2):
            started = time.perf_counter()
            [t.clone() for t in self.tensors.values()]
            if self.device == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - started


class Receiver:
    def __init__(self, model: str, device: str, threads: int):
        torch.set_num_threads(threads)
        self.device, self.engine = device, TransformersEngine(build_policy(model, device), pad_token_id=0)

    def from_object_store(self, buckets):
        weights = {}
        for reference in buckets:
            slots, array = ray.get(reference)
            weights.update(unpack_bucket(bucket_from_object_store(array), slots))
        self.engine.load_weights(weights)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def from_gpu(self, handles):
        weights = {}
        for slots, handle in handles:
            weights.update(unpack_bucket(open_shared(handle), slots))
        self.engine.load_weights(weights)
        torch.cuda.synchronize()

    def checksum(self) -> float:
        return sum(p.double().sum().item() for p in self.engine.model.parameters())

    def join(self, port: int, member: int, members: int):
        self.group = BroadcastGroup("127.0.0.1", port, member, members, self.device)

    def receive(self, plan):
        self.engine.load_weights(self.group.receive(plan))
        if self.device == "cuda":
            torch.cuda.synchronize()


def timed(function, repeats: int = 3) -> float:
    function()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-random"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    gpus = 1 / (args.workers + 1) if args.device == "cuda" else 0
    ray.init(include_dashboard=False, logging_level="ERROR")
    options = dict(num_cpus=0.5, num_gpus=gpus)
    sender = ray.remote(Sender).options(**options).remote(args.model, args.device, 1)
    receivers = [ray.remote(Receiver).options(**options).remote(args.model, args.device, 1) for _ in range(args.workers)]
    size = ray.get(sender.size.remote())
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    print(f"machine: {machine}; torch {torch.__version__}, ray {ray.__version__}")
    print(f"model: {args.model}, {size / 2**20:.0f} MiB sent per sync (tied tensors once); {args.workers} receivers; "
          f"mean of 3 syncs after a warm-up\n")
    copy_seconds = ray.get(sender.memory_copy_seconds.remote())
    print("| transport | bucket MiB | seconds per sync | vs one memory copy |")
    print("|---|---|---|---|")
    print(f"| memory copy on the sender | | {copy_seconds:.3f} | 1.0x |")
    for bucket_mb in (16, 64, 1024):
        bucket_bytes = bucket_mb * 2**20
        seconds = timed(lambda: ray.get([r.from_object_store.remote(sender.to_object_store.remote(bucket_bytes)) for r in receivers]))
        print(f"| object store | {bucket_mb} | {seconds:.3f} | {seconds / copy_seconds:.1f}x |")
    if args.device == "cuda":
        for bucket_mb in (16, 64, 1024):
            seconds = timed(lambda: ray.get([r.from_gpu.remote(sender.on_gpu.remote(bucket_mb * 2**20)) for r in receivers]))
            print(f"| CUDA IPC | {bucket_mb} | {seconds:.3f} | {seconds / copy_seconds:.1f}x |")
    sums = ray.get([sender.checksum.remote()] + [r.checksum.remote() for r in receivers])
    print(f"\nparameter sums after the syncs (sender, receivers): {sums}")
    if args.device == "cpu":
        port, members = free_port(), args.workers + 1
        ray.get([sender.join.remote(port, members)] + [r.join.remote(port, i + 1, members) for i, r in enumerate(receivers)])
        for bucket_mb in (16, 64, 1024):
            plan = ray.get(sender.plan.remote(bucket_mb * 2**20))
            seconds = timed(lambda: ray.get([sender.broadcast.remote(bucket_mb * 2**20)] + [r.receive.remote(plan) for r in receivers]))
            print(f"| broadcast (gloo) | {bucket_mb} | {seconds:.3f} | {seconds / copy_seconds:.1f}x |")
    ray.shutdown()


if __name__ == "__main__":
    main()
