"""The reward model on a DeepSpeed engine: vanilla Bradley-Terry steps and MetaRM bilevel steps.

One instance per rank; every rank is given its own equal share of each global batch, and the engine
averages gradients over ranks, so the update equals the one-rank update on the whole batch. A rank's share is
split into micro-batches (`micro_batch_size` pairs, `meta_micro_batch_size` meta prompts per forward pass) whose
weighted gradients add up to the share's (rayrlhf/training/engines.py).

The MetaRM step follows the authors' recipe (DESIGN.md): back up θ, ascend J on the meta batch to θ'
(`inner_steps` times), back-propagate L at θ', restore θ, optimizer step. The backup and the ascent act on
the tensors the forward pass reads: the whole parameters at ZeRO 0-2, each rank's partition (`ds_tensor`)
at ZeRO-3. The optimizer's fp32 master copy is never touched until the step, so θ' lives only for one pass.
θ + η∇J is computed in float32 and rounded once into θ's dtype: stochastically for bfloat16 by default, since
rounded to nearest most of an ascent at the paper's η vanishes (round_to_dtype, ascent_kept).
"""
import logging
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn
from torch.func import functional_call

from rayrlhf.algos.metarm import ascent_kept, ascent_sizes, ascent_step, backprop_through_ascent, round_to_dtype
from rayrlhf.algos.reward_losses import bradley_terry_loss, difference_loss, preference_accuracy
from rayrlhf.algos.rewards import reward_difference_statistics
from rayrlhf.config import RunConfig
from rayrlhf.data.batches import (PreferenceBatch, ResponseGroupBatch, TokenIds, collate_groups, group_micro_batches,
                                  pair_micro_batches)
from rayrlhf.data.reward_data import RewardData, TokenisedPair, preference_batches
from rayrlhf.models.build import build_reward_model, save_model
from rayrlhf.models.heads import reward_scores
from rayrlhf.seeds import rounding_seed
from rayrlhf.training.distributed import average_across_ranks
from rayrlhf.training.finite import require_finite_losses
from rayrlhf.training.engines import accumulate_gradients, deepspeed_config, enable_gradient_checkpointing

logger = logging.getLogger(__name__)


class RewardModule(nn.Module):
    """Wraps a *ForSequenceClassification model so the engine's forward returns r(x, y): (B, T) -> (B,)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_scores(self.model, input_ids, attention_mask)


class RewardModelTrainer:
    """A reward model, its optimizer (torch AdamW at lr alpha) and its DeepSpeed engine."""

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float,
        eta: float,
        inner_steps: int,
        order: str,
        micro_batch_size: Optional[int],
        zero_stage: int,
        meta_micro_batch_size: Optional[int] = None,
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        max_grad_norm: float = 0.0,
        device: str = "cpu",
        ascent_rounding: str = "stochastic",
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ):
        import deepspeed

        from rayrlhf.training.safe_checkpoints import use_safetensors_checkpoints

        self.eta, self.inner_steps, self.order, self.zero_stage = eta, inner_steps, order, zero_stage
        self.seed, self.warned_about_rounding = seed, False
        self.micro_batch_size, self.meta_micro_batch_size = micro_batch_size, meta_micro_batch_size
        if order == "second" and zero_stage == 3:
            raise ValueError("the second-order MetaRM update needs whole parameters; ZeRO-3 partitions them")
        if order == "second":
            # Hessian-vector products differentiate the backward pass; fused SDPA kernels have no double backward.
            model.set_attn_implementation("eager")
        if order == "second" and gradient_checkpointing:
            # measured: the Hessian-vector products through recomputed activations came out wrong (a tiny RM's
            # parameters 0.05 off the exact second-order step), so the two are not combined
            raise ValueError("the second-order MetaRM update cannot run with gradient checkpointing")
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.parameter_dtype = next(model.parameters()).dtype
        bf16 = self.parameter_dtype == torch.bfloat16
        # round_to_dtype rounds stochastically only into bfloat16; float32 ascents are exact either way.
        self.stochastic_rounding = ascent_rounding == "stochastic" and bf16
        module = RewardModule(model).to(device)
        # A torch optimizer: no JIT build of DeepSpeed's Adam ops (see STACK.md, gpu/README.md).
        # fused: one kernel for the whole update (on 2 CPU cores a 30M-parameter step took 107 ms unfused, 16 fused)
        optimizer = torch.optim.AdamW(module.parameters(), lr=alpha, weight_decay=weight_decay, eps=adam_eps, fused=True)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=deepspeed_config(micro_batch_size or 1, zero_stage, bf16, max_grad_norm),
        )
        use_safetensors_checkpoints(self.engine)
        self.device = self.engine.device

    # ---- scoring -------------------------------------------------------------------------------
    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.engine(input_ids.to(self.device), attention_mask.to(self.device))

    def _preference_loss(self, batch: PreferenceBatch):
        rewards = self.rewards(batch.input_ids, batch.attention_mask)
        chosen, rejected = rewards[: batch.num_pairs], rewards[batch.num_pairs :]
        return bradley_terry_loss(chosen, rejected), preference_accuracy(chosen, rejected)

    def _preference_backward(self, batch: PreferenceBatch) -> Dict[str, float]:
        """Accumulate ∇L over the batch's micro-batches, each L weighted by its share of the pairs; returns L and
        the accuracy of the whole batch."""
        parts = pair_micro_batches(batch, self.micro_batch_size)
        totals = {"loss": 0.0, "accuracy": 0.0}

        def weighted_loss(index: int) -> torch.Tensor:
            weight = parts[index].num_pairs / batch.num_pairs
            loss, accuracy = self._preference_loss(parts[index])
            totals["loss"] += loss.item() * weight
            totals["accuracy"] += accuracy.item() * weight
            return loss * weight

        accumulate_gradients(self.engine, len(parts), weighted_loss)
        return totals

    def _difference_backward(self, batch: ResponseGroupBatch) -> float:
        """Accumulate ∇J over the meta batch's micro-batches (J is a mean over prompts); returns J."""
        parts = group_micro_batches(batch, self.meta_micro_batch_size)
        total = 0.0

        def weighted_difference(index: int) -> torch.Tensor:
            nonlocal total
            part = parts[index]
            rewards = self.rewards(part.input_ids, part.attention_mask).view(-1, part.group_size)
            difference = difference_loss(rewards) * (part.num_prompts / batch.num_prompts)
            total += difference.item()
            return difference

        accumulate_gradients(self.engine, len(parts), weighted_difference)
        return total

    # ---- training steps -----------------------------------------------------------------------
    def vanilla_step(self, batch: PreferenceBatch) -> Dict[str, float]:
        """θ ← θ - α ∇L_θ(X_t)."""
        self.engine.train()
        values = self._preference_backward(batch)
        require_finite_losses(values, "reward-model step")
        self.engine.step()
        return values

    def metarm_step(self, batch: PreferenceBatch, meta_batch: ResponseGroupBatch) -> Dict[str, float]:
        """One MetaRM step (Algorithm 1); first or exact second order by construction argument."""
        self.engine.train()
        if self.order == "second":
            return self._second_order_step(batch, meta_batch)
        live = self._live_tensors()
        backup = [tensor.detach().clone() for tensor in live]
        difference_before = None
        sizes = torch.zeros(2, device=self.device)  # ascent_kept's two sums
        generator = self._rounding_generator()
        for _ in range(self.inner_steps):
            difference = self._difference_backward(meta_batch)  # ∇J summed over micro-batches and ranks
            difference_before = difference if difference_before is None else difference_before
            with torch.no_grad():
                for tensor, gradient in zip(live, self._reduced_gradients()):
                    step = self.eta * gradient.view_as(tensor).float()
                    start = tensor.to(torch.float32, copy=True)
                    # ascent: θ + η∇J in float32, rounded once to θ's dtype
                    tensor.copy_(round_to_dtype(start + step, tensor.dtype, self.stochastic_rounding, generator))
                    sizes += ascent_sizes(start, tensor, step)
            self.engine.optimizer.zero_grad()
        values = self._preference_backward(batch)  # L at θ'
        with torch.no_grad():
            for tensor, saved in zip(live, backup):
                tensor.copy_(saved)  # back to θ; the gradient taken at θ' stays
        require_finite_losses({**values, "difference_loss": difference_before}, "MetaRM step")
        self.engine.step()
        return {**values, "difference_loss": difference_before, "ascent_kept": self._ascent_kept(sizes)}

    def _rounding_generator(self) -> torch.Generator:
        """Noise for stochastic rounding, seeded by the run's seed and the step: every rank draws the same (at
        ZeRO 0-2 each holds the whole θ, which must stay identical), and a resumed run the same as before."""
        return torch.Generator(device=self.device).manual_seed(rounding_seed(self.seed, self.engine.global_steps))

    def _ascent_kept(self, sizes: torch.Tensor) -> float:
        """`ascent_kept` over all ranks (ZeRO-3 ranks each hold a share), warned about once when under half with
        rounding to nearest (stochastic rounding keeps it in expectation; on a small model one step's value
        is noisy)."""
        average_across_ranks([sizes])
        kept = ascent_kept(*sizes.tolist())
        if kept < 0.5 and not self.stochastic_rounding and not self.warned_about_rounding:
            self.warned_about_rounding = True
            logger.warning(f"MetaRM's ascent θ + η∇J kept only {kept:.2f} of its size: at reward.eta={self.eta} "
                           f"most of it rounds away in {self.parameter_dtype} parameters, which makes the step a vanilla one. "
                           "Use reward.ascent_rounding=stochastic, raise reward.eta, or train the reward model in "
                           "float32 (reward_model.dtype)")
        return kept

    def _parameters(self) -> List[nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def _live_tensors(self) -> List[torch.Tensor]:
        """The tensors the forward pass reads: whole parameters, or this rank's ZeRO-3 partitions."""
        if self.zero_stage == 3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            parameters = self._parameters()
            if any(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in parameters):
                raise RuntimeError("a ZeRO-3 parameter is still gathered; the meta step must change the partition")
            return [p.ds_tensor.data for p in parameters]
        return [p.data for p in self._parameters()]

    def _reduced_gradients(self) -> List[torch.Tensor]:
        """Gradients averaged over ranks, laid out like `_live_tensors`."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        read = safe_get_local_grad if self.zero_stage == 3 else safe_get_full_grad
        return [read(p) for p in self._parameters()]

    def _second_order_step(self, batch: PreferenceBatch, meta_batch: ResponseGroupBatch) -> Dict[str, float]:
        """Exact ∇_θ L(θ'(θ)) by reverse accumulation with Hessian-vector products (ZeRO 0-2). Every gradient
        and Hessian-vector product is summed over micro-batches (each term weighted by its share), then ranks."""
        module = self.engine.module
        names = [name for name, p in module.named_parameters() if p.requires_grad]
        theta = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
        meta_parts = [(part.num_prompts / meta_batch.num_prompts, part.to(self.device))
                      for part in group_micro_batches(meta_batch, self.meta_micro_batch_size)]
        pair_parts = [(part.num_pairs / batch.num_pairs, part.to(self.device))
                      for part in pair_micro_batches(batch, self.micro_batch_size)]

        def difference_at(params, part: ResponseGroupBatch):
            rewards = functional_call(module, params, (part.input_ids, part.attention_mask))
            return difference_loss(rewards.view(-1, part.group_size))

        def preference_at(params, part: PreferenceBatch):
            rewards = functional_call(module, params, (part.input_ids, part.attention_mask))
            return bradley_terry_loss(rewards[: part.num_pairs], rewards[part.num_pairs :])

        def averaged_gradient(objective, parts, params, vector=None):
            total = {name: torch.zeros_like(params[name]) for name in names}
            value = 0.0
            for weight, part in parts:
                leaves = {name: params[name].detach().requires_grad_() for name in names}
                part_value = objective(leaves, part) * weight
                gradients = torch.autograd.grad(part_value, list(leaves.values()), create_graph=vector is not None)
                if vector is not None:  # Hessian-vector product: ∇(∇J · v)
                    inner = sum((g * vector[name]).sum() for g, name in zip(gradients, names))
                    gradients = torch.autograd.grad(inner, list(leaves.values()))
                for name, gradient in zip(names, gradients):
                    total[name] += gradient.detach()
                value += part_value.item()
            average_across_ranks(list(total.values()))
            return total, value

        trajectory = [theta]
        difference_before = None
        sizes = torch.zeros(2, device=self.device)
        generator = self._rounding_generator()
        for _ in range(self.inner_steps):
            gradient, difference = averaged_gradient(difference_at, meta_parts, trajectory[-1])
            difference_before = difference if difference_before is None else difference_before
            ascended = ascent_step({name: t.float() for name, t in trajectory[-1].items()},
                                   {name: g.float() for name, g in gradient.items()}, self.eta)
            trajectory.append({name: round_to_dtype(ascended[name].detach(), trajectory[-1][name].dtype,
                                                    self.stochastic_rounding, generator) for name in names})
            for name in names:
                sizes += ascent_sizes(trajectory[-2][name], trajectory[-1][name], self.eta * gradient[name].float())
        outer, loss = averaged_gradient(preference_at, pair_parts, trajectory[-1])
        meta_gradient = backprop_through_ascent(
            outer, trajectory,
            lambda params, vector: averaged_gradient(difference_at, meta_parts, params, vector)[0], self.eta
        )
        # Hand the engine a surrogate whose gradient is the meta-gradient; its rank average is itself.
        surrogate = sum((p * meta_gradient[name]).sum() for name, p in module.named_parameters() if p.requires_grad)
        accumulate_gradients(self.engine, 1, lambda _: surrogate)
        require_finite_losses({"loss": float(loss), "difference_loss": difference_before}, "MetaRM second-order step")
        self.engine.step()
        with torch.no_grad():
            accuracy = sum(weight * preference_accuracy(*_split_pairs(functional_call(
                module, trajectory[-1], (part.input_ids, part.attention_mask)), part.num_pairs)).item()
                for weight, part in pair_parts)
        return {"loss": loss, "accuracy": accuracy, "difference_loss": difference_before,
                "ascent_kept": self._ascent_kept(sizes)}

    def weighted_reward_step(self, samples: ResponseGroupBatch, weights: torch.Tensor, pairs: PreferenceBatch,
                             pairs_weight: float) -> Dict[str, float]:
        """φ ← φ − α ∇_φ [Σ_i w_i r_φ(s_i) + pairs_weight · L(pairs)]: bilevel reward learning's outer step, the
        first-order hypergradient as a weighted reward gradient over the samples (rayrlhf/algos/bilevel.py), with
        the Bradley-Terry loss L of the step's labelled pairs added when pairs_weight > 0. weights: (n,), one per
        sample row, prompt-major like `samples`. Returns the weighted reward, and L and the accuracy on the pairs
        (measured without gradient when pairs_weight is 0)."""
        self.engine.train()
        sample_parts = group_micro_batches(samples, self.meta_micro_batch_size)
        offsets = [0]
        for part in sample_parts:
            offsets.append(offsets[-1] + part.num_prompts * part.group_size)
        values = {"weighted_reward": 0.0}

        def weighted_reward(index: int) -> torch.Tensor:
            part = sample_parts[index]
            total = (weights[offsets[index]: offsets[index + 1]].to(self.device) * self.rewards(part.input_ids, part.attention_mask)).sum()
            values["weighted_reward"] += total.item()
            return total

        losses = [lambda i=i: weighted_reward(i) for i in range(len(sample_parts))]
        if pairs_weight > 0:
            pair_parts = pair_micro_batches(pairs, self.micro_batch_size)
            values.update(loss=0.0, accuracy=0.0)

            def weighted_loss(part: PreferenceBatch) -> torch.Tensor:
                share = part.num_pairs / pairs.num_pairs
                loss, accuracy = self._preference_loss(part)
                values["loss"] += loss.item() * share
                values["accuracy"] += accuracy.item() * share
                return pairs_weight * share * loss

            losses += [lambda part=part: weighted_loss(part) for part in pair_parts]
        else:
            measured = self.evaluate_pairs([pairs])
            values.update(loss=measured["loss"], accuracy=measured["accuracy"])
            self.engine.train()
        accumulate_gradients(self.engine, len(losses), lambda index: losses[index]())
        require_finite_losses(values, "bilevel reward-model step")
        self.engine.step()
        return values

    # ---- evaluation and saving ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate_pairs(self, batches: Iterable[PreferenceBatch], on_batch: Optional[Callable[[], None]] = None
                       ) -> Dict[str, float]:
        """Accuracy and loss over preference batches (this rank's; callers average over ranks)."""
        self.engine.eval()
        correct = total = loss_sum = 0.0
        for batch in batches:
            chosen, rejected = _split_pairs(self.rewards(batch.input_ids, batch.attention_mask), batch.num_pairs)
            correct += (chosen > rejected).sum().item()
            loss_sum += bradley_terry_loss(chosen, rejected).item() * batch.num_pairs
            total += batch.num_pairs
            if on_batch:
                on_batch()
        return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "pairs": int(total)}

    @torch.no_grad()
    def group_rewards(self, batches: Iterable[ResponseGroupBatch], on_batch: Optional[Callable[[], None]] = None
                      ) -> torch.Tensor:
        """(P, k) rewards of response groups, e.g. for the reward-difference statistics."""
        self.engine.eval()
        rewards = []
        for batch in batches:
            rewards.append(self.rewards(batch.input_ids, batch.attention_mask).view(-1, batch.group_size).cpu())
            if on_batch:
                on_batch()
        return torch.cat(rewards)

    def full_parameters(self) -> Dict[str, torch.Tensor]:
        """Whole fp32 copies of every parameter (gathered under ZeRO-3), on CPU."""
        import deepspeed

        parameters = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(parameters.values()), enabled=self.zero_stage == 3):
            return {name: p.detach().float().cpu().clone() for name, p in parameters.items()}

    def save(self, folder: Path, tokenizer) -> None:
        """Write the reward model as a transformers folder (rank 0 writes; all ranks must call)."""
        import deepspeed
        import torch.distributed as dist

        parameters = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(parameters, enabled=self.zero_stage == 3):
            if not dist.is_initialized() or dist.get_rank() == 0:
                save_model(self.engine.module.model, tokenizer, Path(folder))


def _split_pairs(rewards: torch.Tensor, num_pairs: int):
    """(chosen, rejected) rewards of a PreferenceBatch's (2B,) rewards."""
    return rewards[:num_pairs], rewards[num_pairs:]


def build_reward_trainer(config: RunConfig, tokenizer, world_size: int) -> RewardModelTrainer:
    """The reward model of `config.reward_model` on its engine, set up by `config.reward` for this rank's share
    of each global batch (the process group must exist: DeepSpeed needs it)."""
    reward = config.reward
    return RewardModelTrainer(
        build_reward_model(config.reward_model, tokenizer, seed=config.seed),
        alpha=reward.alpha,
        eta=reward.eta,
        inner_steps=reward.inner_steps,
        order=reward.order,
        micro_batch_size=reward.micro_batch_size,
        meta_micro_batch_size=reward.meta_micro_batch_size,
        zero_stage=reward.zero_stage,
        weight_decay=reward.weight_decay,
        adam_eps=reward.adam_eps,
        max_grad_norm=reward.max_grad_norm,
        device=config.resources.device,
        ascent_rounding=reward.ascent_rounding,
        seed=config.seed,
        gradient_checkpointing=reward.gradient_checkpointing,
    )


def train_steps(
    trainer: RewardModelTrainer, pairs: List[TokenisedPair], pad_id: int, *, batch_size: int, epochs: int,
    max_steps: Optional[int], rank: int, world_size: int, seed: int,
    meta_batches: Optional[Iterator[ResponseGroupBatch]] = None,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> List[Dict[str, float]]:
    """Epochs of global batches (this rank's share), MetaRM steps when meta batches are given, else vanilla.
    Epoch e shuffles with seed + e. Returns each step's metrics."""
    history: List[Dict[str, float]] = []
    for epoch in range(epochs):
        for batch in preference_batches(pairs, batch_size, pad_id, rank, world_size, seed + epoch):
            if max_steps is not None and len(history) >= max_steps:
                return history
            values = trainer.metarm_step(batch, next(meta_batches)) if meta_batches else trainer.vanilla_step(batch)
            history.append(values)
            if on_step:
                on_step(len(history), values)
    return history


def evaluation_batch_count(data: RewardData, sequences_per_pass: int) -> int:
    """How many forward passes evaluate_reward_data makes (for a progress bar)."""
    pairs, groups = pairs_per_pass(sequences_per_pass), groups_per_pass(sequences_per_pass, data.meta)
    return sum(-(-len(items) // size) for items, size in
               ((data.evaluation, pairs), (data.target or [], pairs), (data.meta or [], groups)))


def pairs_per_pass(sequences_per_pass: int) -> int:
    return max(1, sequences_per_pass // 2)


def groups_per_pass(sequences_per_pass: int, groups: Optional[List[list]]) -> int:
    return max(1, sequences_per_pass // len(groups[0])) if groups else 1


def group_passes(groups: List[List[TokenIds]], sequences_per_pass: int, pad_id: int) -> List[ResponseGroupBatch]:
    """Response groups as batches of at most `sequences_per_pass` sequences (one whole group at the least)."""
    size = groups_per_pass(sequences_per_pass, groups)
    return [collate_groups(groups[i : i + size], pad_id) for i in range(0, len(groups), size)]


def evaluate_reward_data(trainer: RewardModelTrainer, data: RewardData, sequences_per_pass: int, pad_id: int,
                         on_batch: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Held-out and target accuracy, and the reward-difference statistics on the meta groups (whole sets, every
    rank), at most `sequences_per_pass` sequences per forward pass; `on_batch()` after each pass."""
    pairs = pairs_per_pass(sequences_per_pass)
    evaluation = trainer.evaluate_pairs(preference_batches(data.evaluation, pairs, pad_id, 0, 1, None), on_batch)
    results = {f"eval_{k}": v for k, v in evaluation.items()}
    if data.target:
        target = trainer.evaluate_pairs(preference_batches(data.target, pairs, pad_id, 0, 1, None), on_batch)
        results.update({f"target_{k}": v for k, v in target.items()})
    if data.meta:
        groups = group_passes(data.meta, sequences_per_pass, pad_id)
        results.update(reward_difference_statistics(trainer.group_rewards(groups, on_batch)))
    return results
