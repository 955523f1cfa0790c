"""Win / tie / lose of one policy's responses against another's on the same prompts, by a judge.

A judge scores each (prompt, response) on its own: the programmatic gold reward of the synthetic task, or a
reward model that the run never trained (e.g. one trained on all of the preference data). Response i of the
policy meets response i of the baseline; the verdict is the sign of the score difference, a tie within
`tie_margin`. Each side is scored in a call of its own, so swapping the two sides mirrors every verdict exactly.
"""
from pathlib import Path
from typing import Dict, Optional, Protocol, Sequence

import torch

from rayrlhf.config import RunConfig
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.evaluation.scoring import score_responses


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(N,) judged scores, higher is better."""


class GoldJudge:
    """The synthetic task's gold reward (rayrlhf/data/synthetic.py)."""

    name = "gold reward"

    def __init__(self, task: SyntheticPreferenceTask):
        self.task = task

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.task.gold_reward(p, r) for p, r in zip(prompts, responses)], dtype=torch.float64)


class RewardModelJudge:
    """A reward-model folder (scalar head) as the judge."""

    def __init__(self, folder: str, max_prompt_tokens: int, max_response_tokens: int, device: str = "cpu"):
        from rayrlhf.config import ModelSpec
        from rayrlhf.models.build import build_reward_model, load_tokenizer

        spec = ModelSpec(source=folder)
        self.name = f"reward model {Path(folder).name}"
        self.tokenizer = load_tokenizer(spec)
        self.model = build_reward_model(spec, self.tokenizer).to(device).eval()
        self.limits = {"max_prompt_tokens": max_prompt_tokens, "max_response_tokens": max_response_tokens}

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return score_responses(self.model, self.tokenizer, prompts, responses, **self.limits).double()


def build_judge(config: RunConfig) -> Optional[Judge]:
    """The judge evaluation.judge names (`auto`: gold on the synthetic task, else judge_model), or None."""
    evaluation, data = config.evaluation, config.data
    synthetic = data.preference.format == "synthetic"
    if evaluation.judge == "gold" or (evaluation.judge == "auto" and synthetic):
        return GoldJudge(SyntheticPreferenceTask(data.synthetic, config.seed))
    if evaluation.judge_model:
        return RewardModelJudge(evaluation.judge_model, data.max_prompt_tokens, data.max_response_tokens,
                                config.resources.device)
    return None


def verdicts(first_scores: torch.Tensor, second_scores: torch.Tensor, tie_margin: float) -> torch.Tensor:
    """+1 where the first response wins, -1 where it loses, 0 for |s_1 - s_2| <= tie_margin. (N,), (N,) -> (N,)."""
    difference = first_scores - second_scores
    return torch.where(difference.abs() <= tie_margin, torch.zeros_like(difference), torch.sign(difference))


def win_tie_lose(first_scores: torch.Tensor, second_scores: torch.Tensor, tie_margin: float) -> Dict[str, float]:
    """The first side's win, tie and lose rates over N comparisons, and both sides' mean judged score."""
    outcome = verdicts(first_scores, second_scores, tie_margin)
    return {"win_rate": (outcome > 0).double().mean().item(), "tie_rate": (outcome == 0).double().mean().item(),
            "lose_rate": (outcome < 0).double().mean().item(), "comparisons": outcome.numel(),
            "judge_score": first_scores.double().mean().item(), "judge_score_baseline": second_scores.double().mean().item()}


def compare(judge: Judge, prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
            tie_margin: float) -> Dict[str, float]:
    """win_tie_lose of `first` against `second` (response i of each answers prompts[i])."""
    return win_tie_lose(judge.score(prompts, first), judge.score(prompts, second), tie_margin)
