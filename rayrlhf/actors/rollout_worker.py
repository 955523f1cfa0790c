"""RolloutWorker: holds a copy of the policy and samples responses; takes new weights after each PPO update.

This issue's engine is rayrlhf/models/generation.py (transformers, KV cache, batched, left-padded); the
vLLM engine will sit behind the same methods.
"""
from typing import Dict, List

import torch

from rayrlhf.actors.placement import prepare_actor_process
from rayrlhf.config import RunConfig
from rayrlhf.data.batches import encode_prompts, end_token_id
from rayrlhf.data.reward_data import task_tokenizer
from rayrlhf.data.rollouts import Rollout
from rayrlhf.models.build import build_causal_lm, load_tokenizer
from rayrlhf.models.generation import generate


class RolloutWorker:
    def __init__(self, config: RunConfig, worker_index: int):
        prepare_actor_process(config.resources)
        self.config, self.worker_index = config, worker_index
        self.tokenizer = load_tokenizer(config.policy, task_tokenizer(config.data, config.seed))
        self.device = torch.device(config.resources.device)
        self.model = build_causal_lm(config.policy, self.tokenizer, seed=config.seed).to(self.device).eval()
        self.weights_version = -1

    def load_weights(self, weights: Dict[str, torch.Tensor], version: int) -> int:
        """Copy the trainer's policy weights in place (names as in the policy's state_dict)."""
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"policy weights do not match the worker's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.weights_version = version
        return version

    def generate(self, prompts: List[str], n: int, temperature: float, seed: int) -> Rollout:
        """n responses per prompt (prompt-major rows), with the configured top_p and max_new_tokens."""
        rollout = self.config.rollout
        prompt_ids = encode_prompts(self.tokenizer, prompts, self.config.data.max_prompt_tokens)
        generated = generate(
            self.model, prompt_ids, n=n, temperature=temperature, top_p=rollout.top_p,
            max_new_tokens=rollout.max_new_tokens, eos_token_id=end_token_id(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id, seed=seed,
        )
        rows = generated.prompt_index
        return Rollout(
            prompt_texts=[prompts[i] for i in rows],
            prompt_ids=[prompt_ids[i] for i in rows],
            response_ids=generated.response_ids,
            response_texts=self.tokenizer.batch_decode(generated.response_ids, skip_special_tokens=True),
            log_probs=generated.response_log_probs,
            group_size=n,
        )
