"""How close the first-order hypergradient of bilevel reward learning (rayrlhf/algos/bilevel.py) comes to the exact
one, on real transformer models small enough to unroll exactly: tiny random Llamas (the embedded default's
policy and RM shapes) on the synthetic task, one domain of its prompts.

    python benchmarks/bilevel_hypergradient.py [--steps 1 2 4] [--step-sizes 0.1 1.0] [--seeds 0 1 2] [--out FILE]

For each (inner steps K, step size γ, seed): the exact dL/dφ by backpropagation through the K unrolled policy
steps (unrolled_hypergradient) and the first-order one (first_order_hypergradient); their cosine similarity and
relative error, the ratio of their norms, and the seconds each took. Writes a markdown table (default
benchmarks/results/bilevel_hypergradient.md).
"""
import argparse
import platform
import time
from pathlib import Path
from typing import List, Tuple

import torch
from torch.func import functional_call

from rayrlhf.algos.bilevel import first_order_hypergradient, unrolled_hypergradient
from rayrlhf.config import ModelSpec, SyntheticTask
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.models.build import build_causal_lm, build_reward_model

PROMPTS, SAMPLES_PER_PROMPT, PAIRS, NEW_TOKENS, BETA = 4, 4, 8, 6, 0.1


def encode(tokenizer, rows: List[Tuple[str, str]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask), each (B, T), right-padded: prompt then response tokens."""
    encoded = [(tokenizer(prompt)["input_ids"], tokenizer(response)["input_ids"]) for prompt, response in rows]
    width = max(len(p) + len(r) for p, r in encoded)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention, response = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width)
    for row, (prompt_ids, response_ids) in enumerate(encoded):
        ids[row, : len(prompt_ids) + len(response_ids)] = torch.tensor(prompt_ids + response_ids)
        attention[row, : len(prompt_ids) + len(response_ids)] = 1
        response[row, len(prompt_ids): len(prompt_ids) + len(response_ids)] = 1
    return ids, attention, response


def sequence_log_probs(policy, theta, batch) -> torch.Tensor:
    """log π_θ(response | prompt) per row, (B,)."""
    ids, attention, response = batch
    logits = functional_call(policy, theta, (ids,), {"attention_mask": attention, "use_cache": False}).logits[:, :-1]
    tokens = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tokens * response[:, 1:]).sum(dim=1)


class Domain:
    """One domain of the synthetic task: PROMPTS prompts, SAMPLES_PER_PROMPT policy samples each, PAIRS labelled pairs."""

    def __init__(self, seed: int):
        task = SyntheticPreferenceTask(SyntheticTask(relevance="any", topics_per_prompt=6, reference_topic_rate=0.25), seed)
        self.tokenizer = task.tokenizer()
        spec = ModelSpec(source="tiny")
        self.policy = build_causal_lm(spec, self.tokenizer, seed=seed)
        self.reward_model = build_reward_model(spec, self.tokenizer, seed=seed + 1)
        self.policy.set_attn_implementation("eager")  # SDPA's CPU kernel has no double backward (the exact unroll)
        prompts = [text for _, text in task.prompts()[:PROMPTS]]
        torch.manual_seed(seed)  # the policy's samples: SAMPLES_PER_PROMPT draws per prompt, in order
        samples = [(prompt, self._sample(prompt)) for prompt in prompts for _ in range(SAMPLES_PER_PROMPT)]
        pairs = [row for row in task.preference_pairs() if row["prompt"] in prompts][:PAIRS]
        self.samples, self.prompt_index = encode(self.tokenizer, samples), torch.arange(PROMPTS).repeat_interleave(SAMPLES_PER_PROMPT)
        self.chosen = encode(self.tokenizer, [(row["prompt"], row["chosen"]) for row in pairs])
        self.rejected = encode(self.tokenizer, [(row["prompt"], row["rejected"]) for row in pairs])

    def _sample(self, prompt: str) -> str:
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = self.policy.generate(ids, do_sample=True, max_new_tokens=NEW_TOKENS, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) or "w0"

    def arguments(self, step_size: float) -> dict:
        theta = self.parameters(self.policy)
        with torch.no_grad():
            reference_samples = sequence_log_probs(self.policy, theta, self.samples)
            reference_pairs = self._pair_log_probs(theta)
        ids, attention, _ = self.samples
        return dict(sample_log_probs=lambda t: sequence_log_probs(self.policy, t, self.samples),
                    reference_log_probs=reference_samples,
                    rewards=lambda phi: functional_call(self.reward_model, phi, (ids,), {"attention_mask": attention}).logits[:, 0],
                    prompt_index=self.prompt_index, beta=BETA, step_size=step_size,
                    pair_log_probs=self._pair_log_probs, reference_pair_log_probs=reference_pairs)

    def _pair_log_probs(self, theta) -> torch.Tensor:
        chosen, rejected = (sequence_log_probs(self.policy, theta, batch) for batch in (self.chosen, self.rejected))
        return torch.stack([chosen, rejected], dim=1)

    @staticmethod
    def parameters(model) -> dict:
        return {name: value.detach().clone().requires_grad_() for name, value in model.named_parameters()}


def flat(gradients: dict) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in gradients.values()])


def compare(domain: Domain, steps: int, step_size: float) -> dict:
    times, results = {}, {}
    for name, method in (("exact", unrolled_hypergradient), ("first_order", first_order_hypergradient)):
        start = time.perf_counter()
        results[name] = flat(method(Domain.parameters(domain.policy), Domain.parameters(domain.reward_model), steps,
                                    **domain.arguments(step_size)))
        times[name] = time.perf_counter() - start
    exact, approximate = results["exact"], results["first_order"]
    return {"cosine": torch.nn.functional.cosine_similarity(exact, approximate, dim=0).item(),
            "relative_error": ((approximate - exact).norm() / exact.norm()).item(), "norm": exact.norm().item(),
            "norm_ratio": (approximate.norm() / exact.norm()).item(),
            "exact_seconds": times["exact"], "first_order_seconds": times["first_order"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--step-sizes", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/bilevel_hypergradient.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    lines = ["# First-order against exact hypergradient (bilevel reward learning)", "",
             f"machine: {platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}; torch {torch.__version__}",
             f"command: `python benchmarks/bilevel_hypergradient.py --steps {' '.join(map(str, args.steps))} --step-sizes "
             f"{' '.join(map(str, args.step_sizes))} --seeds {' '.join(map(str, args.seeds))}`", "",
             f"Tiny random Llamas (2 layers, 64 wide) as policy and RM, {PROMPTS} prompts x {SAMPLES_PER_PROMPT} policy samples "
             f"of {NEW_TOKENS} tokens, {PAIRS} labelled pairs, β = {BETA}, float32.", "",
             "| K | γ | seed | cosine | ‖first-order‖ / ‖exact‖ | relative error | ‖exact‖ | exact s | first-order s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for seed in args.seeds:
        domain = Domain(seed)
        for steps in args.steps:
            for step_size in args.step_sizes:
                row = compare(domain, steps, step_size)
                lines.append(f"| {steps} | {step_size} | {seed} | {row['cosine']:.4f} | {row['norm_ratio']:.2f} "
                             f"| {row['relative_error']:.2e} | {row['norm']:.2e} | {row['exact_seconds']:.2f} "
                             f"| {row['first_order_seconds']:.2f} |")
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
