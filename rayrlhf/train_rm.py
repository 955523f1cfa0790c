"""Train a reward model alone, vanilla, MetaRM or bilevel (one process or several gloo/NCCL ranks).

    python -m rayrlhf.train_rm conf/rm_tldr.yaml [key.sub=value ...]

Reports held-out accuracy (split by prompt id), target-domain accuracy where labels exist, and the
reward-difference statistics on the meta data before and after. The Ray reward learner wraps the same
RewardModelTrainer; this entry point is its single-process form.
"""
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from rayrlhf.cli import run_command
from rayrlhf.config import RunConfig, save_config
from rayrlhf.data.reward_data import RewardData, group_batches, prepare_reward_data, task_tokenizer
from rayrlhf.errors import ConfigError
from rayrlhf.metrics import MetricsLogger
from rayrlhf.models.build import load_tokenizer
from rayrlhf.training.bilevel_training import bilevel_train_steps, build_bilevel
from rayrlhf.training.distributed import init_distributed, exit_distributed_process
from rayrlhf.training.reward_trainer import build_reward_trainer, evaluate_reward_data, train_steps

log = logging.getLogger("rayrlhf.train_rm")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train_reward_model(config: RunConfig, rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    """The whole job; returns the final evaluation. Rank 0 writes the run directory."""
    if world_size != config.resources.reward_learner_ranks:
        raise ConfigError(
            f"started with {world_size} ranks but resources.reward_learner_ranks={config.resources.reward_learner_ranks}; "
            "make them equal (the global batch is split by the configured count)"
        )
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.reward_model, task_tokenizer(config.data, config.seed))
    metarm = config.reward.method == "metarm"
    data = prepare_reward_data(config.data, tokenizer, config.reward.samples_per_prompt, metarm, config.seed)
    # the domains and the policy before any engine: bad data or a missing policy stop the run here
    bilevel = build_bilevel(config, tokenizer, rank, world_size) if config.reward.method == "bilevel" else None
    init_distributed(config.resources.device, rank, world_size)
    trainer = build_reward_trainer(config, tokenizer, world_size)
    run_dir = Path(config.run_dir)
    is_writer = rank == 0
    if is_writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    metrics = MetricsLogger(run_dir, enabled=is_writer)
    pad_id = tokenizer.pad_token_id
    before = evaluate_reward_data(trainer, data, config.reward.eval_batch_size, pad_id)
    metrics.log("eval", 0, before)

    if bilevel:
        total = config.reward.max_steps or bilevel.epoch_steps * config.reward.epochs
    else:
        total = vanilla_or_metarm_steps(config, len(data.train))
    if bilevel and is_writer:
        print(bilevel.description, flush=True)
    started = time.perf_counter()
    with tqdm(total=total, desc=f"reward model ({config.reward.method})", disable=not is_writer, file=sys.stderr) as bar:
        def on_step(step: int, values: Dict[str, float]) -> None:
            metrics.log("train", step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.2f}")
            bar.update()

        if bilevel:
            history = bilevel_train_steps(trainer, bilevel.policy, bilevel.batches, total, config.reward.bilevel.vanilla_weight,
                                          on_step)
        else:
            reward = config.reward
            meta_batches = group_batches(data.meta, reward.meta_batch_size, pad_id, rank, world_size, config.seed) if metarm else None
            history = train_steps(trainer, data.train, pad_id, batch_size=reward.batch_size, epochs=reward.epochs, max_steps=total,
                                  rank=rank, world_size=world_size, seed=config.seed, meta_batches=meta_batches, on_step=on_step)
    step = len(history)
    after = evaluate_reward_data(trainer, data, config.reward.eval_batch_size, pad_id)
    after["train_seconds"] = time.perf_counter() - started
    after["steps"] = step
    metrics.log("eval", step, after)
    metrics.close()
    trainer.save(run_dir / "reward_model", tokenizer)
    if is_writer:
        print_summary(before, after, data)
    return after


def vanilla_or_metarm_steps(config: RunConfig, train_pairs: int) -> int:
    """Steps of a vanilla or MetaRM training: reward.epochs passes of reward.batch_size pairs, at most max_steps."""
    total = train_pairs // config.reward.batch_size * config.reward.epochs
    return min(total, config.reward.max_steps) if config.reward.max_steps else total


def print_summary(before: Dict[str, float], after: Dict[str, float], data: RewardData) -> None:
    print(f"pairs: train {len(data.train)}, held-out {len(data.evaluation)}"
          + (f", target {len(data.target)}" if data.target else "")
          + (f", meta prompts {len(data.meta)}" if data.meta else "")
          + (f"; dropped {data.dropped}" if data.dropped else ""))
    print(f"{'metric':<32}{'before':>12}{'after':>12}")
    for key in before:
        if isinstance(before[key], float):
            print(f"{key:<32}{before[key]:>12.4f}{after[key]:>12.4f}")
    print(f"held-out accuracy: {after['eval_accuracy']:.4f} ({after['steps']} steps, {after['train_seconds']:.1f} s)")


def main(argv: Optional[List[str]] = None) -> int:
    def job(config: RunConfig) -> None:
        train_reward_model(config, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    code = run_command(__doc__, argv, job)
    if code == 0:
        exit_distributed_process()
    return code


if __name__ == "__main__":
    sys.exit(main())
