"""RewardLearner: one rank of the reward-model group. Every rank loads the preference data itself, holds a
DeepSpeed RM engine (rayrlhf/training/reward_trainer.py) and takes its share of each global batch; the
driver calls every method on all ranks at once through RewardLearnerGroup (below) and reads rank 0's answer.

Text crosses the actor boundary, not token ids: the RM may tokenize differently from the policy.
"""
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from rayrlhf.checkpoints import read_files, write_files
from rayrlhf.config import RunConfig
from rayrlhf.data.batches import encode_prompt_response, pad_right
from rayrlhf.data.reward_data import group_batches, prepare_reward_data, task_tokenizer
from rayrlhf.memory import releasing_memory
from rayrlhf.models.build import load_tokenizer
from rayrlhf.seeds import reward_training_seed
from rayrlhf.training.bilevel_training import bilevel_train_steps, build_bilevel
from rayrlhf.training.distributed import init_distributed, teardown_distributed
from rayrlhf.training.reward_trainer import (RewardModelTrainer, build_reward_trainer, evaluate_reward_data,
                                             evaluation_batch_count, group_passes, train_steps)

import ray

from rayrlhf.actors.placement import RankActor, RankGroup, prepare_actor_process

MetaGroups = List[Tuple[str, List[str]]]
"""(prompt, k responses) per prompt: MetaRM's meta data as text."""


class RewardLearner(RankActor):
    def __init__(self, config: RunConfig, rank: int, world_size: int):
        prepare_actor_process(config, f"reward_learner_{rank}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.tokenizer = load_tokenizer(config.reward_model, task_tokenizer(config.data, config.seed))
        self.pad_id = self.tokenizer.pad_token_id
        fixed_meta = config.reward.method == "metarm" and config.reward.meta_source == "data"
        self.data = prepare_reward_data(config.data, self.tokenizer, config.reward.samples_per_prompt, fixed_meta, config.seed)
        # bilevel meta-training (the RM phase of a Tune sweep) holds the reference policy and the domains' batches
        self.bilevel = build_bilevel(config, self.tokenizer, rank, world_size) if config.reward.method == "bilevel" else None
        self.trainer: Optional[RewardModelTrainer] = None

    @releasing_memory  # what loading the model took beyond the model itself
    def join_process_group(self, master_addr: str, master_port: int) -> None:
        """Form the group with the other ranks, then build the engine (DeepSpeed needs the group)."""
        init_distributed(self.config.resources.device, self.rank, self.world_size, master_port, master_addr)
        self.trainer = build_reward_trainer(self.config, self.tokenizer, self.world_size)

    def _encode(self, prompt: str, response: str) -> List[int]:
        data = self.config.data
        return encode_prompt_response(self.tokenizer, prompt, response, data.max_prompt_tokens, data.max_response_tokens)

    # ---- training ------------------------------------------------------------------------------
    @releasing_memory
    def train_initial(self) -> Dict[str, float]:
        """Vanilla Bradley-Terry epochs on the preference data (before round 1)."""
        reward = self.config.reward
        torch.manual_seed(self.config.seed)
        progress = self._progress("initial RM (vanilla)", reward.initial_epochs, reward.initial_max_steps)
        history = train_steps(self.trainer, self.data.train, self.pad_id, batch_size=reward.batch_size,
                              epochs=reward.initial_epochs, max_steps=reward.initial_max_steps, rank=self.rank,
                              world_size=self.world_size, seed=self.config.seed, on_step=progress)
        return _summary(history, "initial_rm")

    def _progress(self, description: str, epochs: int, max_steps: Optional[int]):
        """An on_step callback that moves a progress bar shown by the driver (rank 0 only)."""
        steps = epochs * (len(self.data.train) // self.config.reward.batch_size)
        bar = self._bar(description, min(steps, max_steps or steps))
        return None if bar is None else lambda step, values: bar()

    def _bar(self, description: str, total: int) -> Optional[Callable[[], None]]:
        """A progress bar of `total` items shown by the driver (rank 0 only, and only for more than one item):
        returns the call that advances it by one, closing it at the last."""
        if self.rank != 0 or total <= 1:
            return None
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(desc=description, total=total)

        def advance() -> None:
            bar.update(1)
            if bar.n >= total:
                bar.close()

        return advance

    @releasing_memory
    def train_round(self, round_index: int, meta_groups: Optional[MetaGroups]) -> Dict[str, float]:
        """This round's RM training: MetaRM with the given meta data (or the fixed data.meta), or vanilla."""
        reward = self.config.reward
        progress = self._progress(f"round {round_index} RM ({reward.method})", reward.epochs, reward.max_steps)
        history = self._train(reward_training_seed(self.config.seed, round_index), reward.epochs, meta_groups, progress)
        return _summary(history, "rm")

    @releasing_memory
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        """Epoch `epoch` (from 1) on the fixed data (a Tune trial of the RM phase), seeded by the epoch alone so
        a trial resumed from its checkpoint trains the later epochs as an uninterrupted one would. Bilevel: an
        epoch is reward.max_steps steps, else a pass over the domains' labelled pairs."""
        seed = reward_training_seed(self.config.seed, epoch)
        if self.bilevel is None:
            return _summary(self._train(seed, 1, None, None), "train")
        torch.manual_seed(seed)
        self.bilevel.batches.reseed(seed)
        steps = self.config.reward.max_steps or self.bilevel.epoch_steps
        history = bilevel_train_steps(self.trainer, self.bilevel.policy, self.bilevel.batches, steps,
                                      self.config.reward.bilevel.vanilla_weight)
        return _summary(history, "train")

    def _train(self, seed: int, epochs: int, meta_groups: Optional[MetaGroups], progress) -> List[Dict[str, float]]:
        reward = self.config.reward
        torch.manual_seed(seed)  # dropout, if the RM has any, replays identically on resume
        meta_batches = None
        if reward.method == "metarm":
            groups = self.data.meta if meta_groups is None else [
                [self._encode(prompt, response) for response in responses] for prompt, responses in meta_groups]
            meta_batches = group_batches(groups, reward.meta_batch_size, self.pad_id, self.rank, self.world_size, seed)
        return train_steps(self.trainer, self.data.train, self.pad_id, batch_size=reward.batch_size,
                           epochs=epochs, max_steps=reward.max_steps, rank=self.rank,
                           world_size=self.world_size, seed=seed, meta_batches=meta_batches, on_step=progress)

    # ---- scoring and evaluation --------------------------------------------------------------------
    @releasing_memory
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        """r(x, y) for every (prompt, response). Each rank scores an equal contiguous share (the last item
        repeated to fill it, so ZeRO-3 ranks run the same number of passes); all ranks return the whole list."""
        count = len(prompts)
        share = -(-count // self.world_size)
        padded = [min(i, count - 1) for i in range(share * self.world_size)]
        mine = padded[self.rank * share : (self.rank + 1) * share]
        sequences = [self._encode(prompts[i], responses[i]) for i in mine]
        size = self.config.reward.eval_batch_size
        progress = self._bar("scoring", -(-len(sequences) // size))
        local = []
        self.trainer.engine.eval()
        with torch.no_grad():
            for start in range(0, len(sequences), size):
                ids, mask = pad_right(sequences[start : start + size], self.pad_id)
                local.append(self.trainer.rewards(ids, mask).float().cpu())
                if progress:
                    progress()
        scores = torch.cat(local)
        if self.world_size > 1:
            import torch.distributed as dist

            gathered = [torch.empty_like(scores) for _ in range(self.world_size)]
            dist.all_gather(gathered, scores)
            scores = torch.cat(gathered)
        return scores[:count].tolist()

    @releasing_memory
    def evaluate(self) -> Dict[str, float]:
        """Held-out and target accuracy on the whole evaluation sets (every rank computes the same)."""
        size = self.config.reward.eval_batch_size
        progress = self._bar("evaluating the RM", evaluation_batch_count(self.data, size))
        return evaluate_reward_data(self.trainer, self.data, size, self.pad_id, progress)

    @releasing_memory
    def group_scores(self, meta_groups: MetaGroups) -> List[List[float]]:
        """(P, k) rewards of response groups, eval_batch_size sequences per forward pass."""
        groups = [[self._encode(p, r) for r in responses] for p, responses in meta_groups]
        batches = group_passes(groups, self.config.reward.eval_batch_size, self.pad_id)
        return self.trainer.group_rewards(batches).tolist()  # a few passes: a bar here would only add lines

    # ---- weights and checkpoints -------------------------------------------------------------------
    def critic_weights(self) -> Dict[str, torch.Tensor]:
        """The RM's parameters with transformers' names, to initialise the critic."""
        return {name.removeprefix("model."): t for name, t in self.trainer.full_parameters().items()}

    def save_checkpoint(self, folder: str) -> None:
        self.trainer.engine.save_checkpoint(str(Path(folder) / "reward_model"), tag="state")

    def load_checkpoint(self, folder: str) -> None:
        path, _ = self.trainer.engine.load_checkpoint(str(Path(folder) / "reward_model"), tag="state")
        if path is None:
            raise FileNotFoundError(f"no reward-model checkpoint under {folder}")

    def checkpoint_files(self) -> Dict[str, bytes]:
        """This rank's checkpoint files as bytes (relative path -> content): for a caller on another node."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_checkpoint(folder)
            return read_files(Path(folder))

    def load_checkpoint_files(self, files: Dict[str, bytes]) -> None:
        """Load a checkpoint given as every rank's files (the union of their checkpoint_files)."""
        with tempfile.TemporaryDirectory() as folder:
            write_files(Path(folder), files)
            self.load_checkpoint(folder)

    def save_model(self, folder: str) -> None:
        self.trainer.save(Path(folder), self.tokenizer)

    def shutdown(self) -> None:
        teardown_distributed()


class RewardLearnerGroup(RankGroup[RewardLearner]):
    """The driver's side of the reward learner: each method runs RewardLearner's method of the same name on every
    rank at once and returns rank 0's answer (the ranks compute the same one)."""

    def train_initial(self) -> Dict[str, float]:
        return self.on_every_rank(lambda rank: rank.train_initial.remote())[0]

    def train_round(self, round_index: int, meta_groups: Optional[MetaGroups]) -> Dict[str, float]:
        return self.on_every_rank(lambda rank: rank.train_round.remote(round_index, meta_groups))[0]

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        return self.on_every_rank(lambda rank: rank.train_epoch.remote(epoch))[0]

    def evaluate(self) -> Dict[str, float]:
        return self.on_every_rank(lambda rank: rank.evaluate.remote())[0]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        return self.on_every_rank(lambda rank: rank.score.remote(prompts, responses))[0]

    def group_scores(self, meta_groups: MetaGroups) -> List[List[float]]:
        return self.on_every_rank(lambda rank: rank.group_scores.remote(meta_groups))[0]

    def critic_weights_reference(self) -> ray.ObjectRef:
        """Rank 0's critic_weights as an ObjectRef, to pass on without fetching (every rank is asked: gathering
        sharded parameters is a collective)."""
        return [rank.critic_weights.remote() for rank in self.actors][0]

    def save_checkpoint(self, folder: str) -> None:
        self.on_every_rank(lambda rank: rank.save_checkpoint.remote(folder))

    def load_checkpoint(self, folder: str) -> None:
        self.on_every_rank(lambda rank: rank.load_checkpoint.remote(folder))

    def checkpoint_files(self) -> List[Dict[str, bytes]]:
        """Every rank's checkpoint_files."""
        return self.on_every_rank(lambda rank: rank.checkpoint_files.remote())

    def load_checkpoint_files(self, files: Dict[str, bytes]) -> None:
        self.on_every_rank(lambda rank: rank.load_checkpoint_files.remote(files))

    def save_model(self, folder: str) -> None:
        self.on_every_rank(lambda rank: rank.save_model.remote(folder))


def _summary(history: List[Dict[str, float]], prefix: str) -> Dict[str, float]:
    """Means of the per-step metrics, plus the step count."""
    if not history:
        return {f"{prefix}_steps": 0}
    names = [name for name, value in history[0].items() if value is not None]
    return {f"{prefix}_steps": len(history), **{f"{prefix}_{n}": sum(h[n] for h in history) / len(history) for n in names}}
