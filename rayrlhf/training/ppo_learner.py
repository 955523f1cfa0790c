"""PPO on DeepSpeed engines: the policy and the critic train, a frozen reference anchors the KL penalty.

One instance per rank. Every rank gets its own equal share of a rollout; the engines average gradients
over ranks, advantages are whitened with statistics summed over ranks, and each rank's token-mean loss is
weighted by its share of the mini-batch's tokens (ranks' responses differ in length), so the update
equals the one-rank update on the whole rollout. Each rank's share of a mini-batch runs in micro-batches of
`micro_batch_size` rows, each token-mean loss weighted by its share of the tokens, so the accumulated gradient
is the whole share's (rayrlhf/training/engines.py); the no-grad passes run `forward_micro_batch_size` rows at
a time (the passes themselves: rayrlhf/training/ppo_passes.py). Per step (Ouyang et al. 2022; the MetaRM
paper's settings):

    old log π, log π_ref, V                    one no-grad pass over the rollout
    r_t = -β KL_t (+ clip(r(x, y)) on the last token)     rayrlhf/algos/rewards.py
    A, R = GAE(r, V; γ, λ), A whitened          rayrlhf/algos/ppo.py
    epochs × mini-batches of the clipped policy and value losses

With ppo.group_invariant enabled, group invariant learning adds its terms (rayrlhf/training/group_invariance.py,
docs/methods.md): a KL coefficient per sequence, the policy's invariance penalty and the group predictor's loss.
"""
import copy
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from rayrlhf.algos.group_invariant import sequence_surrogates
from rayrlhf.algos.kl import kl_estimate
from rayrlhf.algos.ppo import (
    clipped_policy_loss,
    truncated_importance_weights,
    clipped_value_loss,
    explained_variance,
    generalized_advantage_estimation,
    masked_mean,
    masked_whiten,
)
from rayrlhf.algos.rewards import clip_rewards, token_level_rewards
from rayrlhf.config import PPOConfig
from rayrlhf.data.batches import TokenIds, micro_batch_slices
from rayrlhf.data.rollouts import Rollout, SequenceBatch, collate_sequences
from rayrlhf.training.distributed import average_across_ranks, sum_across_ranks, world_size
from rayrlhf.training.finite import require_finite_losses
from rayrlhf.training.group_invariance import GroupInvariance
from rayrlhf.training.engines import accumulate_gradients, enable_gradient_checkpointing
from rayrlhf.training.ppo_passes import (build_engine, forward_in_micro_batches, response_log_probs, response_values,
                                         response_values_and_features)


@dataclass
class Experience:
    """What the PPO epochs need, for this rank's B rows of R response positions (all (B, R) but the last)."""

    batch: SequenceBatch  # prompt + response token ids
    mask: torch.Tensor  # 1.0 on response tokens
    old_log_probs: torch.Tensor  # log π_old of the response tokens (the policy before this step)
    values: torch.Tensor  # V_old, the critic before this step
    advantages: torch.Tensor  # GAE, whitened over every rank's tokens
    returns: torch.Tensor  # A + V_old: the value targets
    kl: torch.Tensor  # the KL estimate to the reference, per token
    entropy: Optional[torch.Tensor]  # of π_old, per token (None with old_log_probs=engine: the updates measure it)
    critic_features: torch.Tensor  # (B, H): the critic's last-token hidden state (group invariant learning's input)
    engine_log_probs: torch.Tensor  # log π_engine: the rollout engine's, of the policy that sampled the responses

    def rows(self, chosen: torch.Tensor) -> "Experience":
        """The rows `chosen` (indices): one mini-batch."""
        per_row = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[chosen]
                   for f in fields(self) if f.name != "batch"}
        return Experience(batch=self.batch.select(chosen), **per_row)

    def behaviour_weights(self, cap: Optional[float]) -> Optional[torch.Tensor]:
        """Truncated importance weights min(π_old / π_engine, cap) of the response tokens, (B, R); None without a cap."""
        return None if cap is None else truncated_importance_weights(self.old_log_probs, self.engine_log_probs, cap) * self.mask


class PPOLearner:
    """Policy, critic and reference on one rank."""

    def __init__(self, policy: nn.Module, critic: nn.Module, settings: PPOConfig, *, micro_batch_size: int,
                 pad_id: int, device: str):
        """micro_batch_size: rows of a rank's mini-batch share (DeepSpeed's record of it); the passes themselves
        take settings.micro_batch_size and settings.forward_micro_batch_size rows."""
        self.settings, self.pad_id, self.micro_batch_size = settings, pad_id, micro_batch_size
        self.forward_rows = settings.forward_micro_batch_size or settings.micro_batch_size
        if settings.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
            enable_gradient_checkpointing(critic)
        self.policy = build_engine(policy.to(device), settings.policy_lr, micro_batch_size, settings.zero_stage, settings.max_grad_norm)
        self.critic = build_engine(critic.to(device), settings.critic_lr, micro_batch_size, settings.zero_stage,
                                   settings.max_grad_norm, settings.group_invariant.predictor_lr)
        self.device = self.policy.device
        self.reference = self.freeze_reference()
        # group invariant learning (off by default): the critic carries its group head (attach_group_head)
        self.groups = GroupInvariance(settings.group_invariant, self.critic) if settings.group_invariant.enabled else None

    def freeze_reference(self) -> nn.Module:
        """π_ref: a frozen copy of the policy as it is now (after any SFT warm-up)."""
        reference = copy.deepcopy(self.policy.module).eval()
        reference.requires_grad_(False)
        self.reference = reference
        return reference

    # ---- supervised warm-up --------------------------------------------------------------------
    def sft_step(self, prompt_ids: Sequence[TokenIds], response_ids: Sequence[TokenIds], lr: float) -> Dict[str, float]:
        """One cross-entropy step on the response tokens (this rank's share of the batch)."""
        self._set_policy_lr(lr)
        self.policy.train()
        batch = collate_sequences(prompt_ids, response_ids, self.pad_id).to(self.device)

        def loss_of(part: SequenceBatch, rows: slice):
            log_probs, _ = response_log_probs(self.policy, part, with_entropy=False)
            return -masked_mean(log_probs, part.response_mask.float()), {}

        loss = self._accumulated_step("SFT", self.policy, batch, batch.response_mask.float(), loss_of)["loss"]
        return {"sft_loss": _mean_over_ranks(loss)}

    def end_sft(self) -> None:
        """Back to the PPO learning rate with fresh Adam moments, and re-anchor the reference."""
        self._set_policy_lr(self.settings.policy_lr)
        optimizer = getattr(self.policy.optimizer, "optimizer", self.policy.optimizer)
        optimizer.state.clear()
        self.freeze_reference()

    def _set_policy_lr(self, lr: float) -> None:
        for group in self.policy.optimizer.param_groups:
            group["lr"] = lr

    # ---- PPO -------------------------------------------------------------------------------------
    @torch.no_grad()
    def experience(self, rollout: Rollout, scores: torch.Tensor, kl_coefficient: float) -> Dict[str, torch.Tensor]:
        """Everything the PPO epochs need, for this rank's rows. scores: (B,) RM rewards of the rows."""
        settings = self.settings
        batch = collate_sequences(rollout.prompt_ids, rollout.response_ids, self.pad_id).to(self.device)
        mask = batch.response_mask.float()
        self.policy.eval()
        self.critic.eval()
        engine_log_probs = _padded(rollout.log_probs, mask.shape).to(self.device) * mask
        if settings.old_log_probs == "engine":  # no policy pass: the engine's log-probs are π_old's
            old_log_probs, entropy = engine_log_probs, None
        else:
            old_log_probs, entropy = forward_in_micro_batches(lambda part: response_log_probs(self.policy, part), batch,
                                                              self.forward_rows)
        (reference_log_probs,) = forward_in_micro_batches(lambda part: response_log_probs(self.reference, part, False)[:1],
                                                          batch, self.forward_rows)
        values, features = forward_in_micro_batches(lambda part: response_values_and_features(self.critic, part), batch,
                                                    self.forward_rows)
        kl = kl_estimate(old_log_probs, reference_log_probs, settings.kl_estimator) * mask
        sequence_rewards = clip_rewards(scores.to(self.device), settings.reward_clip)
        if self.groups is not None:  # one KL coefficient per sequence, (B, 1)
            kl_coefficient = self.groups.kl_coefficients(features, sequence_rewards, kl_coefficient)
        rewards = token_level_rewards(sequence_rewards, kl, mask, kl_coefficient)
        advantages, returns = generalized_advantage_estimation(rewards, values, mask, settings.gamma, settings.lam)
        sums = torch.stack([(advantages * mask).sum(), (advantages**2 * mask).sum(), mask.sum()])
        sum_across_ranks(sums)
        advantages = masked_whiten(advantages, mask, *sums)
        return Experience(batch, mask, old_log_probs, values, advantages, returns, kl, entropy, features, engine_log_probs)

    def train(self, experience: "Experience", seed: int) -> Dict[str, float]:
        """settings.epochs passes of settings.mini_batches mini-batches; returns means over the updates."""
        settings = self.settings
        rows = experience.mask.shape[0]
        size = rows // settings.mini_batches
        generator = torch.Generator().manual_seed(seed)
        self.policy.train()
        self.critic.train()
        history: List[Dict[str, float]] = []
        for _ in range(settings.epochs):
            order = torch.randperm(rows, generator=generator)
            for start in range(0, rows - size + 1, size):
                chosen = order[start : start + size].to(self.device)
                history.append(self._update(experience.rows(chosen), first=not history))
        names = dict.fromkeys(name for h in history for name in h)  # some only in the first update
        return {name: sum(h[name] for h in history if name in h) / sum(name in h for h in history) for name in names}

    def _update(self, part: "Experience", first: bool) -> Dict[str, float]:
        """One mini-batch's updates of the policy and the critic. `first`: the step's first, where θ is still π_old."""
        settings, mask = self.settings, part.mask
        from_engine = settings.old_log_probs == "engine"
        penalty_weights, predictor_weights, extra = None, None, {}
        behaviour_weights = part.behaviour_weights(settings.behaviour_ratio_cap)
        if self.groups is not None:
            penalty_weights, extra["gil_penalty"] = self._invariance_penalty_weights(part)
            predictor_weights = self.groups.predictor_weights(part.critic_features, part.returns[:, 0])

        def policy_loss_of(micro: SequenceBatch, rows: slice):
            log_probs, entropy = response_log_probs(self.policy, micro, with_entropy=from_engine)
            loss, metrics = clipped_policy_loss(log_probs, part.old_log_probs[rows], part.advantages[rows], mask[rows],
                                                settings.clip_range, None if behaviour_weights is None else behaviour_weights[rows])
            if from_engine:  # no trainer pass measured these: the update's pass does (at π_old in the first update)
                metrics["entropy"] = masked_mean(entropy.detach(), mask[rows])
                if first:
                    metrics["logprob_mismatch"] = masked_mean((log_probs.detach() - part.engine_log_probs[rows]).abs(), mask[rows])
            if penalty_weights is None:
                return loss, metrics
            surrogates = sequence_surrogates(log_probs, part.old_log_probs[rows], part.advantages[rows], mask[rows],
                                             settings.clip_range)
            return loss, metrics, (penalty_weights[rows] * surrogates).sum()  # ∇ of β_policy Var_g(S_g), this part's share

        def value_loss_of(micro: SequenceBatch, rows: slice):
            loss, metrics = clipped_value_loss(response_values(self.critic, micro), part.values[rows],
                                               part.returns[rows], mask[rows], settings.value_clip_range)
            if predictor_weights is None:
                return loss, metrics
            probabilities = self.groups.probabilities(part.critic_features[rows])
            return loss, metrics, (predictor_weights[rows] * probabilities).sum()  # ∇ of -β_critic Var_g(R_g)

        policy = self._accumulated_step("PPO policy", self.policy, part.batch, mask, policy_loss_of)
        critic = self._accumulated_step("PPO critic", self.critic, part.batch, mask, value_loss_of)
        return {"policy_loss": policy.pop("loss"), "value_loss": critic.pop("loss"), **policy, **critic, **extra}

    @torch.no_grad()
    def _invariance_penalty_weights(self, part: "Experience") -> Tuple[torch.Tensor, float]:
        """GIL: each row's weight in the policy's invariance penalty, from the surrogates at the current θ (a
        no-gradient pass over the mini-batch), and the penalty's value β_policy Var_g(S_g)."""
        settings = self.settings
        (log_probs,) = forward_in_micro_batches(lambda micro: response_log_probs(self.policy, micro, False)[:1],
                                                part.batch, self.forward_rows)
        surrogates = sequence_surrogates(log_probs, part.old_log_probs, part.advantages, part.mask, settings.clip_range)
        return self.groups.penalty_weights(part.critic_features, surrogates)

    def _accumulated_step(self, name: str, engine, batch: SequenceBatch, mask: torch.Tensor,
                          loss_of: Callable[[SequenceBatch, slice], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
                          ) -> Dict[str, float]:
        """One optimizer step of `engine` on the token mean of loss_of over the batch (this rank's rows) and
        the other ranks': micro-batches of settings.micro_batch_size rows, each token-mean loss weighted by
        its share of the global tokens. Returns the loss and metrics as token means over this rank's rows.
        loss_of returns (loss, metrics) or (loss, metrics, term): a term already weighted for the whole batch (group
        invariant learning's), added to the backward pass as it is."""
        share, tokens = _token_share(mask), mask.sum()
        slices = micro_batch_slices(len(batch), self.settings.micro_batch_size)
        totals: Dict[str, float] = {}

        def weighted_loss(index: int) -> torch.Tensor:
            rows = slices[index]
            loss, metrics, *term = loss_of(batch.part(rows), rows)
            weight = mask[rows].sum() / tokens  # the micro-batch's share of this rank's tokens
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + (value * weight).item()
            return loss * weight * share + (term[0] if term else 0.0)

        accumulate_gradients(engine, len(slices), weighted_loss)
        require_finite_losses(totals, f"{name} update")
        engine.step()
        return totals

    def summarise(self, experience: "Experience", trained: Dict[str, float]) -> Dict[str, float]:
        """Step metrics averaged over ranks: KL to the reference, entropy, length, explained variance, losses (and with
        group invariant learning the groups' sizes, mean returns, their variance and KL)."""
        mask = experience.mask
        local = {
            **trained,
            "kl_per_token": masked_mean(experience.kl, mask).item(),
            "kl_per_sequence": experience.kl.sum(dim=1).mean().item(),
            "response_length": mask.sum(dim=1).mean().item(),
            "explained_variance": explained_variance(experience.values, experience.returns, mask).item(),
        }
        if experience.entropy is not None:  # else (old_log_probs=engine) the updates measured both: in `trained`
            local["entropy"] = masked_mean(experience.entropy, mask).item()
            local["logprob_mismatch"] = masked_mean((experience.engine_log_probs - experience.old_log_probs).abs(), mask).item()
        cap = self.settings.behaviour_ratio_cap
        if cap is not None:  # how far the sampling policy was from π_old, and how often truncation acted
            log_ratio = experience.old_log_probs - experience.engine_log_probs
            local["behaviour_weight_mean"] = masked_mean(experience.behaviour_weights(cap), mask).item()
            local["behaviour_truncated_fraction"] = masked_mean((log_ratio > math.log(cap)).float(), mask).item()
        if self.groups is not None:  # whole-batch group statistics (reduced over ranks), after the step's updates
            local.update(self.groups.metrics(experience.critic_features, experience.returns[:, 0], experience.kl.sum(dim=1)))
        values = torch.tensor(list(local.values()), dtype=torch.float64)
        average_across_ranks([values])
        return dict(zip(local, values.tolist()))

    # ---- weights, greedy reference decoding, saving -------------------------------------------------
    def policy_weights(self) -> Dict[str, torch.Tensor]:
        """The policy's parameters and buffers as CPU tensors, for the rollout workers."""
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.policy.module.state_dict().items()}

    @torch.no_grad()
    def greedy_decode(self, prompt_ids: Sequence[TokenIds], max_new_tokens: int, eos_id: int) -> List[TokenIds]:
        """transformers' own greedy generate, one unpadded prompt at a time (an independent check of the workers)."""
        model = self.policy.module
        model.eval()
        outputs = []
        for prompt in prompt_ids:
            ids = torch.tensor([prompt], device=self.device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=self.pad_id)
            outputs.append(generated[0, len(prompt):].tolist())
        return outputs

    def save_checkpoint(self, folder: Path) -> None:
        """Engines' weights and optimizer states (every rank calls)."""
        self.policy.save_checkpoint(str(Path(folder) / "policy"), tag="state")
        self.critic.save_checkpoint(str(Path(folder) / "critic"), tag="state")

    def load_checkpoint(self, folder: Path) -> None:
        for name, engine in (("policy", self.policy), ("critic", self.critic)):
            path, _ = engine.load_checkpoint(str(Path(folder) / name), tag="state")
            if path is None:
                raise FileNotFoundError(f"no {name} checkpoint under {folder}")


def _padded(rows: Sequence[Sequence[float]], shape) -> torch.Tensor:
    out = torch.zeros(shape)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def _token_share(mask: torch.Tensor) -> torch.Tensor:
    """This rank's tokens over the mean tokens per rank: weighting a rank's token-mean loss by it makes the
    rank-averaged gradient the gradient of the token mean over the whole global mini-batch."""
    tokens = mask.sum()
    total = tokens.detach().clone()
    sum_across_ranks(total)
    return tokens * world_size() / total.clamp(min=1)


def _mean_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    average_across_ranks([tensor])
    return tensor.item()
