"""A tiny reward model, fixed batches and a DeepSpeed trainer, shared by the trainer tests and run by torchrun.

    python -m torch.distributed.run --nproc_per_node N tests/helpers/tiny_rm.py OUT.pt ZERO_STAGE ORDER [MICRO META_MICRO]

runs STEPS MetaRM steps (ORDER first or second; `vanilla`: vanilla steps) on the global batches (each rank its share,
in micro-batches of MICRO pairs and
META_MICRO meta prompts when given) and has rank 0 save the parameters.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rayrlhf.config import ModelSpec, SyntheticTask  # noqa: E402
from rayrlhf.data.batches import collate_groups, collate_pair_list, encode_group_rows, encode_pair_rows, rank_shard  # noqa: E402
from rayrlhf.data.synthetic import SyntheticPreferenceTask  # noqa: E402
from rayrlhf.models.build import build_reward_model  # noqa: E402

ETA, ALPHA, INNER_STEPS, STEPS = 0.05, 1e-2, 2, 3
PAIRS_PER_STEP, PROMPTS_PER_STEP, K = 4, 2, 3
ADAM_EPS = 1e-3  # a large eps keeps Adam from magnifying float noise in near-zero gradients
# Second-order steps compared to this: float32 Hessian-vector products summed in another order (torch.func, micro-
# batches, ranks) differed by up to 1.8e-5 on 2-core AMD EPYC machines (1.2e-5 to 1.8e-5, 2026-12-03 to 12-05, at
# 1 and 2 threads), while first- and second-order parameters lie 0.049 apart: the margin is still 490x.
SECOND_ORDER_ATOL = 1e-4


def task_and_tokenizer():
    task = SyntheticPreferenceTask(SyntheticTask(num_prompts=20), seed=0)
    return task, task.tokenizer()


def tiny_reward_model(tokenizer):
    return build_reward_model(ModelSpec(source="tiny"), tokenizer, seed=0)


def global_batches(rank: int = 0, world_size: int = 1):
    """STEPS (preference batch, meta batch) pairs; each rank gets its contiguous share."""
    task, tokenizer = task_and_tokenizer()
    pairs = encode_pair_rows(tokenizer, task.preference_pairs().select(range(STEPS * PAIRS_PER_STEP)), 32, 16)
    groups = encode_group_rows(tokenizer, task.drifted_response_groups(K).select(range(STEPS * PROMPTS_PER_STEP)), 32, 16)
    batches = []
    for step in range(STEPS):
        step_pairs = pairs[step * PAIRS_PER_STEP:(step + 1) * PAIRS_PER_STEP]
        step_groups = groups[step * PROMPTS_PER_STEP:(step + 1) * PROMPTS_PER_STEP]
        batches.append((collate_pair_list(rank_shard(step_pairs, rank, world_size), tokenizer.pad_token_id),
                        collate_groups(rank_shard(step_groups, rank, world_size), tokenizer.pad_token_id)))
    return batches


def make_trainer(zero_stage: int, order: str = "first", micro_batch_size=None, meta_micro_batch_size=None, **options):
    from rayrlhf.training.reward_trainer import RewardModelTrainer

    _, tokenizer = task_and_tokenizer()
    return RewardModelTrainer(
        tiny_reward_model(tokenizer), alpha=ALPHA, eta=ETA, inner_steps=INNER_STEPS, order=order,
        micro_batch_size=micro_batch_size, meta_micro_batch_size=meta_micro_batch_size, zero_stage=zero_stage,
        adam_eps=ADAM_EPS, **options,
    )


def main(out: str, zero_stage: int, order: str, micro_batch_size=None, meta_micro_batch_size=None) -> None:
    import torch.distributed as dist

    from rayrlhf.training.distributed import init_distributed, exit_distributed_process

    init_distributed("cpu")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    trainer = make_trainer(zero_stage, "first" if order == "vanilla" else order, micro_batch_size, meta_micro_batch_size)
    for preference, meta in global_batches(rank, world_size):
        trainer.vanilla_step(preference) if order == "vanilla" else trainer.metarm_step(preference, meta)
    parameters = trainer.full_parameters()
    if rank == 0:
        torch.save(parameters, out)
    exit_distributed_process()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *(int(size) for size in sys.argv[4:6]))
