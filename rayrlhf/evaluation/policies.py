"""A run's policies, loaded in this process, answering held-out prompts; and their KL to the initial policy.

Policies: `initial` (run_dir/reference: the policy after the SFT warm-up, which PPO's KL penalty holds on to),
`final` (run_dir/policy), and `round_N` (the policy inside checkpoint round N, a DeepSpeed state in safetensors).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rayrlhf.checkpoints import checkpoint_path, complete_checkpoints, round_of
from rayrlhf.config import RunConfig
from rayrlhf.data.batches import encode_prompts, end_token_id
from rayrlhf.data.rollouts import collate_sequences
from rayrlhf.models.build import build_causal_lm
from rayrlhf.engines.generation import generate
from rayrlhf.training.ppo_passes import sequence_log_probs as batch_log_probs
from rayrlhf.training.safe_checkpoints import load_state


@dataclass
class PolicySamples:
    """n responses per prompt, prompt-major: row i answers prompts[i // n]."""

    prompts: List[str]  # the prompt of each row
    responses: List[str]
    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    log_probs: torch.Tensor  # (N,) Σ_t log π(y_t | x, y_<t) of each row under the policy that sampled it

    @property
    def lengths(self) -> List[int]:
        """Response tokens of each row (the end token included where the policy stopped)."""
        return [len(ids) for ids in self.response_ids]


def load_policy(config: RunConfig, run_dir: Path, name: str) -> PreTrainedModel:
    """`initial`, `final` or `round_N` of a run, in eval mode on the run's device."""
    folder = {"initial": run_dir / "reference", "final": run_dir / "policy"}.get(name, run_dir / "reference")
    model = build_causal_lm(config.policy.model_copy(update={"source": str(folder)}), None)
    if name not in ("initial", "final"):  # the reference's architecture, the checkpoint's DeepSpeed module state
        round_index = int(name.removeprefix("round_"))
        state_file = checkpoint_path(run_dir, round_index) / "ppo" / "policy" / "state" / "mp_rank_00_model_states.pt"
        model.load_state_dict(load_state(str(state_file))["module"])
    return model.to(config.resources.device).eval()


def checkpoint_policies(run_dir: Path) -> List[str]:
    """`round_N` for every round checkpoint (N > 0) in the run dir, oldest first."""
    return [f"round_{round_of(folder)}" for folder in complete_checkpoints(run_dir) if round_of(folder) > 0]


def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], config: RunConfig,
           seed: int) -> PolicySamples:
    """evaluation.samples_per_prompt responses per prompt, sampled as the rollout workers sample (temperature,
    top_p, max_new_tokens of config.rollout), with the same seed for every policy (common random numbers)."""
    rollout, n = config.rollout, config.evaluation.samples_per_prompt
    prompt_ids = encode_prompts(tokenizer, prompts, config.data.max_prompt_tokens)
    generated = generate(model, prompt_ids, n=n, temperature=rollout.temperature, top_p=rollout.top_p,
                         max_new_tokens=rollout.max_new_tokens, eos_token_id=end_token_id(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, seed=seed, batch_size=64)
    rows = generated.prompt_index
    return PolicySamples(
        prompts=[prompts[i] for i in rows],
        responses=tokenizer.batch_decode(generated.response_ids, skip_special_tokens=True),
        prompt_ids=[prompt_ids[i] for i in rows],
        response_ids=generated.response_ids,
        log_probs=torch.tensor([sum(values) for values in generated.response_log_probs], dtype=torch.float64),
    )


@torch.no_grad()
def sequence_log_probs(model: PreTrainedModel, samples: PolicySamples, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N,) Σ_t log π_model(y_t | x, y_<t) of each sample's response under `model`."""
    totals = []
    for start in range(0, len(samples.responses), batch_size):
        rows = slice(start, start + batch_size)
        batch = collate_sequences(samples.prompt_ids[rows], samples.response_ids[rows], pad_id).to(model.device)
        totals.append(batch_log_probs(model, batch).cpu())
    return torch.cat(totals)


def kl_estimate(policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> float:
    """KL(π || π_ref) ≈ mean over samples y ~ π of log π(y|x) - log π_ref(y|x) (k1, per sequence): exact in
    expectation when sampling at temperature 1 without top-p; (N,), (N,) -> float."""
    return (policy_log_probs - reference_log_probs).mean().item()


def length_statistics(samples: PolicySamples) -> Dict[str, float]:
    """Mean response length in tokens and in whitespace-separated words."""
    return {"length_tokens": sum(samples.lengths) / len(samples.lengths),
            "length_words": sum(len(text.split()) for text in samples.responses) / len(samples.responses)}
