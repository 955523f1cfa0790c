"""Time of a MetaRM step over a vanilla RM step on the same batches, beside the floor the extra passes imply.

    python benchmarks/metarm_overhead.py [--model tiny|minilm] [--repeats 10] [--inner-steps 1 2]

Floor: a vanilla step runs forward+backward over the 2B sequences of B pairs; a MetaRM step with s inner
steps adds s forward+backward passes over the P·k meta sequences, so ideally
    ratio_floor = (2B + s·P·k) / 2B    (sequences of similar length).
The rest of the ratio is the parameter backup/restore and the gradient read-out. Steps of the two kinds
are interleaved so that machine noise hits both alike.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayrlhf.config import ModelSpec, SyntheticTask  # noqa: E402
from rayrlhf.data.batches import collate_groups, collate_pair_list, encode_group_rows, encode_pair_rows  # noqa: E402
from rayrlhf.data.synthetic import SyntheticPreferenceTask  # noqa: E402
from rayrlhf.models.build import build_reward_model, load_tokenizer  # noqa: E402
from rayrlhf.training.distributed import init_distributed  # noqa: E402
from rayrlhf.training.reward_trainer import RewardModelTrainer  # noqa: E402


def batches(tokenizer, pairs: int, prompts: int, k: int):
    task = SyntheticPreferenceTask(SyntheticTask(max_response_words=12), seed=0)
    preference = encode_pair_rows(tokenizer, task.preference_pairs().select(range(pairs)), 32, 32)
    meta = encode_group_rows(tokenizer, task.drifted_response_groups(k).select(range(prompts)), 32, 32)
    return collate_pair_list(preference, tokenizer.pad_token_id), collate_groups(meta, tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    init_distributed("cpu")
    task_tokenizer = SyntheticPreferenceTask(SyntheticTask(), 0).tokenizer()
    spec = ModelSpec(source=args.model, tiny={"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024})
    tokenizer = load_tokenizer(spec, task_tokenizer)
    preference, meta = batches(tokenizer, args.pairs, args.prompts, args.k)

    def trainer(inner_steps: int) -> RewardModelTrainer:
        return RewardModelTrainer(build_reward_model(spec, tokenizer), alpha=1e-5, eta=1e-5, inner_steps=inner_steps,
                                  order="first", micro_batch_size=args.pairs, zero_stage=0)

    vanilla = trainer(1)
    metarm = {s: trainer(s) for s in args.inner_steps}
    times = {"vanilla": []} | {s: [] for s in args.inner_steps}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        started = time.perf_counter()
        vanilla.vanilla_step(preference)
        if repeat:
            times["vanilla"].append(time.perf_counter() - started)
        for s, engine in metarm.items():
            started = time.perf_counter()
            engine.metarm_step(preference, meta)
            if repeat:
                times[s].append(time.perf_counter() - started)

    parameters = sum(p.numel() for p in vanilla.engine.module.parameters())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}; "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"model: {args.model} ({parameters / 1e6:.1f}M parameters); {args.pairs} pairs ({preference.input_ids.shape[0]}x"
          f"{preference.input_ids.shape[1]} tokens), meta {args.prompts} prompts x k={args.k} ({meta.input_ids.shape[0]}x"
          f"{meta.input_ids.shape[1]} tokens); median of {args.repeats}")
    base = statistics.median(times["vanilla"])
    print(f"{'step':<22}{'median s':>10}{'ratio':>8}{'floor':>8}")
    print(f"{'vanilla':<22}{base:>10.4f}{1.0:>8.2f}{1.0:>8.2f}")
    for s in args.inner_steps:
        floor = (preference.input_ids.numel() + s * meta.input_ids.numel()) / preference.input_ids.numel()
        median = statistics.median(times[s])
        print(f"{f'metarm inner_steps={s}':<22}{median:>10.4f}{median / base:>8.2f}{floor:>8.2f}")


if __name__ == "__main__":
    main()
