"""Top-p for vLLM through rayrlhf's `top_p_filter`, as a vLLM logits processor.

On CPU, vLLM's own top-p sorts every row's whole vocabulary every step: 35% of vLLM's decoding
time for SmolLM2-135M (benchmarks/results/rollout.md). So `VLLMEngine` asks vLLM for top_p=1.0, which skips
its sort, and passes the real top-p here in the request's extra_args. vLLM calls this processor after
temperature scaling and before sampling, as it would its own top-p: the same nucleus, found by a top-k of a
few hundred tokens where that covers it (rayrlhf/engines/sampling.py).

Loaded by vLLM by name ("rayrlhf.engines.vllm_nucleus:NucleusFilter"); imports vLLM, unlike vllm_engine.py.
"""
from typing import Dict, Optional

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from rayrlhf.engines.sampling import top_p_filter

TOP_P_KEY = "rayrlhf_top_p"  # the request's top-p, in SamplingParams.extra_args


class NucleusFilter(LogitsProcessor):
    """Masks every token outside the nucleus of each request that has a top-p below 1 in its extra_args."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.top_p_by_row: Dict[int, float] = {}  # row of vLLM's persistent batch -> its request's top-p
        self.rows, self.top_p = self._as_tensors()

    def is_argmax_invariant(self) -> bool:
        return True  # the most likely token is always in the nucleus, so greedy rows need no call

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        changed = process_dict_updates(self.top_p_by_row, batch_update,
                                       lambda params, _prompt, _output: requested_top_p(params))
        if changed:  # the tensors follow the batch's make-up, not every decoding step
            self.rows, self.top_p = self._as_tensors()

    def _as_tensors(self):
        """(R,) rows and (R, 1) top-p values of the requests with a nucleus to keep."""
        rows = torch.tensor(list(self.top_p_by_row), dtype=torch.long, device=self.device)
        top_p = torch.tensor(list(self.top_p_by_row.values()), dtype=torch.float32, device=self.device)
        return rows, top_p.unsqueeze(1)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.top_p_by_row:
            return logits
        logits[self.rows] = top_p_filter(logits[self.rows], self.top_p)
        return logits


def requested_top_p(params: SamplingParams) -> Optional[float]:
    """The request's top-p from its extra_args, or None when it asks for none (or for 1: nothing to mask)."""
    top_p = (params.extra_args or {}).get(TOP_P_KEY)
    return top_p if top_p is not None and top_p < 1.0 else None
