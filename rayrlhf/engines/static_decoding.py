"""Decoding a batch with a KV cache of fixed size, so that every decode step has the same tensor shapes and,
on CUDA, runs as one replay of a captured CUDA graph instead of hundreds of kernel launches.

Plain `model.generate` on a GPU is launch-bound for small models: a 135M model at batch 64 spends its decode
step launching kernels, not reading weights (../shared/gpu/README.md). Here the step's inputs live in fixed
buffers (token, position, cache slot, attention mask), the cache is preallocated at its full length, and the
step is captured once per batch shape; each later step copies its inputs into the buffers and replays.

The model sees a transformers-compatible cache object (`update(keys, values, layer_idx)`) and an already built
4-D additive mask, which transformers passes through unchanged, so no transformers cache class or mask code
runs inside the graph. Sampling (rayrlhf/engines/sampling.py) runs outside it, with the caller's generator.
"""
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rayrlhf.engines.sampling import next_tokens

# Steps between checks whether every row has ended: each check waits for the GPU, so not every step.
EOS_CHECK_EVERY = 8


GROUPED_DECODE_ATTENTION = "rayrlhf_grouped_decode"


def grouped_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for a masked one-token decode step with grouped KV heads:
    query (B, H, 1, D), key and value (B, Hkv, L, D), mask (B, 1, 1, L). transformers would copy the whole cache
    H / Hkv times (repeat_kv) every step, since SDPA takes no mask with grouped heads on CUDA; here the H / Hkv
    query heads of each group become that group's query rows, (B, Hkv, H / Hkv, D), and attend to the cache as
    stored. Returns (B, 1, H, D) as transformers' attention functions do."""
    batch, heads, query_length, head_dim = query.shape
    groups = heads // key.shape[1]
    if query_length != 1 or groups == 1 or attention_mask is None or module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    grouped_query = query.view(batch, key.shape[1], groups, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(grouped_query, key, value, attn_mask=attention_mask,
                                                              scale=scaling)  # (B, Hkv, G, D)
    return output.reshape(batch, heads, 1, head_dim).transpose(1, 2), None


AttentionInterface.register(GROUPED_DECODE_ATTENTION, grouped_decode_attention)
AttentionMaskInterface.register(GROUPED_DECODE_ATTENTION, sdpa_mask)  # masks built exactly as for SDPA


def use_grouped_decode_attention(model) -> None:
    """Switch a model that uses SDPA attention to `grouped_decode_attention` (the same outside masked decode steps)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GROUPED_DECODE_ATTENTION)


class SlotKVCache:
    """Keys and values of every layer in (rows, kv_heads, length, head_dim) buffers; each forward writes its
    new keys at `slots` (a (q,) tensor of cache positions set by the decoder) and attends over the whole length."""

    def __init__(self, length: int):
        self.length = length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.slots: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *unused):
        """(B, H, q, D) new keys and values -> (B, H, length, D) of this layer, with the new ones at `slots`."""
        if layer_idx not in self.keys:  # first (eager) prefill: allocate with the model's head sizes and dtype
            rows, heads, _, head_dim = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(rows, heads, self.length, head_dim)
            self.values[layer_idx] = value_states.new_zeros(rows, value_states.shape[1], self.length, value_states.shape[3])
        self.keys[layer_idx].index_copy_(2, self.slots, key_states)
        self.values[layer_idx].index_copy_(2, self.slots, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, L) mask to add to attention scores: 0 where `keep`, the dtype's minimum elsewhere (finite, so a
    row with nothing to attend, a left-pad position, averages instead of making NaN)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class StaticCacheDecoder:
    """Decodes batches for one model; keeps its cache, buffers and captured graph between calls of the same
    batch size whose prompt width plus new tokens fit the cache (a larger request re-allocates)."""

    def __init__(self, model, use_cuda_graph: bool):
        self.model, self.use_cuda_graph = model, use_cuda_graph
        self.rows = self.length = 0
        self.graph = None

    def _prepare(self, rows: int, length: int) -> None:
        if rows == self.rows and length <= self.length:
            return
        self.rows, self.length = rows, -(-length // 64) * 64  # round up so nearby requests reuse it
        device, dtype = self.model.device, self.model.dtype
        self.cache = SlotKVCache(self.length)
        self.step_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.step_positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.step_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.step_mask = torch.zeros(rows, 1, 1, self.length, dtype=dtype, device=device)
        self.graph = None

    def _forward_step(self) -> torch.Tensor:
        """(B, 1, V) logits of one decode step from the buffers."""
        self.cache.slots = self.step_slot
        return self.model(input_ids=self.step_ids, position_ids=self.step_positions, attention_mask=self.step_mask,
                          past_key_values=self.cache, use_cache=True).logits

    def _decode_step(self) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self._forward_step()
        if self.graph is None:
            # Warm-up on a side stream (as torch.cuda.graphs asks), then capture. The warm-up writes the same
            # keys to the same slot as the real step, so it changes nothing.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward_step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_logits = self._forward_step()
        self.graph.replay()
        return self.graph_logits

    @torch.no_grad()
    def decode(self, prompts: list[list[int]], generator: torch.Generator, *, temperature: float, top_p: float,
               max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> tuple[list[list[int]], list[list[float]]]:
        """Responses (cut after the first eos) and their raw log-probs (temperature 1, no top-p) for one batch
        of left-padded prompts."""
        rows, width = len(prompts), max(len(prompt) for prompt in prompts)
        self._prepare(rows, width + max_new_tokens)
        device = self.model.device
        input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        prompt_keep = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        key_keep = torch.zeros(rows, self.length, dtype=torch.bool, device=device)  # (B, L)
        key_keep[:, :width] = prompt_keep
        causal = torch.ones(width, self.length, dtype=torch.bool, device=device).tril()  # (W, L): key <= query
        prompt_positions = (prompt_keep.long().cumsum(-1) - 1).clamp(min=0)

        # Prefill (eager, shapes vary with the prompt width): writes slots 0..W-1, predicts the first token.
        self.cache.slots = torch.arange(width, device=device)
        logits = self.model(input_ids=input_ids, position_ids=prompt_positions, past_key_values=self.cache,
                            attention_mask=additive_mask(key_keep[:, None, None, :] & causal[None, None], self.model.dtype),
                            use_cache=True, logits_to_keep=1).logits[:, -1].float()
        self.step_mask.copy_(additive_mask(key_keep[:, None, None, :], self.model.dtype))
        next_position = prompt_positions[:, -1:] + 1  # (B, 1)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        step_tokens, step_log_probs = [], []
        for step in range(max_new_tokens):
            tokens = next_tokens(logits, temperature, top_p, generator)  # (B,)
            step_tokens.append(tokens)
            step_log_probs.append(logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1))
            done |= tokens == eos_token_id
            if step == max_new_tokens - 1 or (step % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and done.all()):
                break
            # The token just chosen goes into slot W + step at its row's next position.
            self.step_ids.copy_(tokens[:, None])
            self.step_positions.copy_(next_position + step)
            self.step_slot.fill_(width + step)
            self.step_mask[..., width + step] = 0
            logits = self._decode_step()[:, -1].float()
        all_tokens = torch.stack(step_tokens, dim=1).tolist()  # (B, T)
        all_log_probs = torch.stack(step_log_probs, dim=1).tolist()
        responses, log_probs = [], []
        for tokens, token_log_probs in zip(all_tokens, all_log_probs):
            length = tokens.index(eos_token_id) + 1 if eos_token_id in tokens else len(tokens)
            responses.append(tokens[:length])
            log_probs.append(token_log_probs[:length])
        return responses, log_probs
