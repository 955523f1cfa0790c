"""Batched sampling from a transformers causal LM: left padding, a fixed-size KV cache (CUDA-graph decoding on
GPU, rayrlhf/engines/static_decoding.py), seeded torch.Generator.

`generate` returns each response with the log-probs of its tokens under the model's raw distribution, as PPO
needs them. `TransformersEngine` wraps it with the interface the vLLM engine (rayrlhf/engines/vllm_engine.py)
also has, so a rollout worker holds either.
"""
from dataclasses import dataclass

import torch

from rayrlhf.engines.static_decoding import StaticCacheDecoder, use_grouped_decode_attention


@dataclass
class GeneratedBatch:
    """n responses per prompt, prompt-major: row i answers prompts[i // n]."""

    prompt_index: list[int]  # index into `prompts` of each row
    response_ids: list[list[int]]  # generated tokens; ends with eos_token_id if the model stopped there
    response_log_probs: list[list[float]]  # log π(token | prefix) under the raw (temperature 1, no top-p) model

    @property
    def num_tokens(self) -> int:
        """Total generated tokens over all rows."""
        return sum(len(ids) for ids in self.response_ids)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
             eos_token_id: int, pad_token_id: int, seed: int, batch_size: int | None = None,
             decoder: StaticCacheDecoder | None = None) -> GeneratedBatch:
    """n sampled responses per prompt (len(prompts) * n rows, prompt-major), decoded `batch_size` rows at a time
    (None: all at once) by `decoder` (None: a new one without CUDA graphs). Temperature 0 is greedy. Same seed
    and inputs give the same batch."""
    if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError(f"generate needs n >= 1, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 and non-empty prompts "
                         f"(got n={n}, max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p})")
    prompt_index = [index for index in range(len(prompts)) for _ in range(n)]
    rows = [prompts[index] for index in prompt_index]
    chunk_size = batch_size or max(len(rows), 1)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    decoder = decoder or StaticCacheDecoder(model, use_cuda_graph=False)
    was_training = model.training
    model.eval()
    response_ids, response_log_probs = [], []
    try:
        for start in range(0, len(rows), chunk_size):
            ids, log_probs = decoder.decode(rows[start:start + chunk_size], generator, temperature=temperature,
                                            top_p=top_p, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                            pad_token_id=pad_token_id)
            response_ids += ids
            response_log_probs += log_probs
    finally:
        model.train(was_training)
    return GeneratedBatch(prompt_index, response_ids, response_log_probs)


class TransformersEngine:
    """The rollout-engine interface (generate, load_weights, shutdown) over a transformers model in this process.
    On CUDA each decode step replays a captured CUDA graph; weights load in place, so the graph stays valid."""

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad_token_id = model.eval(), pad_token_id
        use_grouped_decode_attention(model)
        self.decoder = StaticCacheDecoder(model, use_cuda_graph=model.device.type == "cuda")

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 eos_token_id: int, seed: int) -> GeneratedBatch:
        return generate(self.model, prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        eos_token_id=eos_token_id, pad_token_id=self.pad_token_id, seed=seed, decoder=self.decoder)

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the named tensors into the model in place (a tied tensor sent once updates both of its names)."""
        state = self.model.state_dict()
        unknown = [name for name in weights if name not in state]
        if unknown:
            raise RuntimeError(f"policy weights do not match the engine's model: unknown names {unknown[:5]}")
        for name, tensor in weights.items():
            state[name].copy_(tensor)

    def shutdown(self) -> None:
        """Nothing outlives this engine."""
