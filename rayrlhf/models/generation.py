"""Batched sampling from a transformers causal LM: left padding, KV cache, seeded torch.Generator.

`generate` returns each response with the log-probs of its tokens under the model's raw distribution, as PPO
needs them. `TransformersEngine` wraps it with the interface the vLLM engine (rayrlhf/models/vllm_engine.py)
also has, so a rollout worker holds either.
"""
from dataclasses import dataclass

import torch


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


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) logits with -inf outside the nucleus: the fewest most-likely tokens whose probability sums to
    >= top_p (the top token always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) tokens from (B, V) logits: argmax at temperature 0, else a nucleus sample at `temperature`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _generate_chunk(model, prompts: list[list[int]], generator: torch.Generator, *, temperature: float,
                    top_p: float, max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int) -> tuple[list[list[int]], list[list[float]]]:
    """Responses and their raw log-probs for one chunk of rows, decoded together with the KV cache."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    past_key_values, step_tokens, step_log_probs = None, [], []
    for _ in range(max_new_tokens):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=True, logits_to_keep=1)
        past_key_values = output.past_key_values
        logits = output.logits[:, -1].float()  # (B, V)
        tokens = _next_tokens(logits, temperature, top_p, generator)  # (B,)
        step_tokens.append(tokens)
        step_log_probs.append(logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1))
        done |= tokens == eos_token_id
        if done.all():
            break
        input_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(prompts), 1)], dim=-1)
    if not step_tokens:
        return [[] for _ in prompts], [[] for _ in prompts]
    all_tokens = torch.stack(step_tokens, dim=1).tolist()  # (B, T)
    all_log_probs = torch.stack(step_log_probs, dim=1).tolist()
    responses, log_probs = [], []
    for tokens, token_log_probs in zip(all_tokens, all_log_probs):
        length = tokens.index(eos_token_id) + 1 if eos_token_id in tokens else len(tokens)
        responses.append(tokens[:length])
        log_probs.append(token_log_probs[:length])
    return responses, log_probs


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
             eos_token_id: int, pad_token_id: int, seed: int, batch_size: int | None = None) -> GeneratedBatch:
    """n sampled responses per prompt (len(prompts) * n rows, prompt-major), decoded `batch_size` rows at a time
    (None: all at once). Temperature 0 is greedy. Same seed and inputs give the same batch."""
    if n < 1 or temperature < 0 or not 0 < top_p <= 1 or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError(f"generate needs n >= 1, temperature >= 0, 0 < top_p <= 1 and non-empty prompts "
                         f"(got n={n}, temperature={temperature}, top_p={top_p})")
    prompt_index = [index for index in range(len(prompts)) for _ in range(n)]
    rows = [prompts[index] for index in prompt_index]
    chunk_size = batch_size or max(len(rows), 1)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    response_ids, response_log_probs = [], []
    try:
        for start in range(0, len(rows), chunk_size):
            ids, log_probs = _generate_chunk(model, rows[start:start + chunk_size], generator,
                                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            response_ids += ids
            response_log_probs += log_probs
    finally:
        model.train(was_training)
    return GeneratedBatch(prompt_index, response_ids, response_log_probs)


class TransformersEngine:
    """The rollout-engine interface (generate, load_weights, shutdown) over a transformers model in this process."""

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad_token_id = model.eval(), pad_token_id

    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 eos_token_id: int, seed: int) -> GeneratedBatch:
        return generate(self.model, prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                        eos_token_id=eos_token_id, pad_token_id=self.pad_token_id, seed=seed)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"policy weights do not match the engine's model: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def shutdown(self) -> None:
        """Nothing outlives this engine."""
