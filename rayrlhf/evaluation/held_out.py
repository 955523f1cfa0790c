"""The round loop's judged metrics: the current policy against the initial one on held-out prompts.

The initial policy's responses are drawn once, when the run starts (the rollout workers then hold it), and kept
in run_dir/evaluation/initial_held_out.jsonl, so that a resumed run judges against the same ones. Every judged
round samples with the same seed (common random numbers: the comparison's noise is the policies' difference).
"""
import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional

from rayrlhf.evaluation.judging import Judge, compare

log = logging.getLogger(__name__)
Sampler = Callable[[List[str], int, int], List[str]]  # (prompts, n, seed) -> n responses per prompt, prompt-major


class HeldOutJudging:
    def __init__(self, judge: Judge, prompts: List[str], samples_per_prompt: int, tie_margin: float, seed: int,
                 run_dir: Path):
        self.judge, self.prompts, self.n, self.tie_margin, self.seed = judge, prompts, samples_per_prompt, tie_margin, seed
        self.path = Path(run_dir) / "evaluation" / "initial_held_out.jsonl"
        self.initial: Optional[List[str]] = None

    @property
    def rows(self) -> List[str]:
        """The prompt of each response row."""
        return [prompt for prompt in self.prompts for _ in range(self.n)]

    def record_initial(self, sample: Sampler) -> None:
        """Sample the initial policy's responses (call while the workers hold it) and keep them in the run dir."""
        self.initial = sample(self.prompts, self.n, self.seed)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(self.rows, self.initial)),
                           encoding="utf-8")
        staging.replace(self.path)

    def load_initial(self) -> bool:
        """The recorded initial responses (a resumed run); False, with a warning, when the run did not record them."""
        if not self.path.is_file():
            log.warning("%s is missing (evaluation.every_rounds was off when this run started): no judged metrics", self.path)
            return False
        self.initial = [json.loads(line)["response"] for line in self.path.read_text(encoding="utf-8").splitlines()]
        return True

    def judge_policy(self, sample: Sampler) -> Dict[str, float]:
        """win/tie/lose rates and judged scores of the current policy against the initial one ({} when unrecorded)."""
        if self.initial is None:
            return {}
        judged = compare(self.judge, self.rows, sample(self.prompts, self.n, self.seed), self.initial, self.tie_margin)
        judged["judge_score_initial"] = judged.pop("judge_score_baseline")
        judged.pop("comparisons")
        return judged
