"""DeepSpeed checkpoints written and read as safetensors, so that loading a checkpoint never unpickles.

DeepSpeed hands its checkpoint engine nested state dicts (model states, each rank's ZeRO partition with
its optimizer state) and would `torch.save` them: a pickle, which runs code when loaded. This engine
stores every tensor in a safetensors file and the rest of the structure as JSON in that file's metadata.
Non-tensor leaves are JSON values, containers are tagged (dict keys keep their type: optimizer state is
keyed by int), and the few DeepSpeed objects in ZeRO state (loss scalers, fragment addresses, the stage
enum) are rebuilt only from the allow-list below; anything else is refused when saving, and a file that is
not safetensors (an old pickled checkpoint, or a planted one) is refused when loading.

File names stay DeepSpeed's (`*_model_states.pt`, `*_optim_states.pt`): DeepSpeed finds files by name.
"""
import enum
import importlib
import json
from collections import OrderedDict
from typing import Any, Dict

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rayrlhf.models.finite import require_finite_tensors

STRUCTURE_KEY = "rayrlhf.structure"

# The only classes a checkpoint may name; rebuilt from their fields, never by running pickled code.
ALLOWED_OBJECTS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
}


class UnsafeCheckpointError(RuntimeError):
    pass


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _allowed_class(name: str) -> type:
    if name not in ALLOWED_OBJECTS:
        raise UnsafeCheckpointError(f"checkpoint names class {name!r}, which is not on the allow-list")
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def encode(value: Any, tensors: Dict[str, torch.Tensor], where: str = "state") -> Any:
    """A JSON-able description of `value`; its tensors are added to `tensors` (as they are: see writable)."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach()
        return {"tensor": name}
    if isinstance(value, enum.Enum):
        return {"enum": _qualified_name(type(value)), "value": value.value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple, set)):
        kind = type(value).__name__ if type(value) in (list, tuple, set) else "list"
        return {kind: [encode(item, tensors, f"{where}[{index}]") for index, item in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode(key, tensors, where), encode(item, tensors, f"{where}[{key!r}]")] for key, item in value.items()],
                "ordered": isinstance(value, OrderedDict)}
    name = _qualified_name(type(value))
    if name in ALLOWED_OBJECTS:
        return {"object": name, "fields": encode(vars(value), tensors, where)}
    raise UnsafeCheckpointError(f"cannot store {where} of type {name} in a safetensors checkpoint")


def decode(description: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`."""
    if not isinstance(description, dict):
        return description
    (kind, payload), *rest = description.items()
    if kind == "tensor":
        return tensors[payload]
    if kind == "size":
        return torch.Size(payload)
    if kind == "dtype":
        return getattr(torch, payload)
    if kind in ("list", "tuple", "set"):
        return {"list": list, "tuple": tuple, "set": set}[kind](decode(item, tensors) for item in payload)
    if kind == "dict":
        pairs = [(_hashable(decode(key, tensors)), decode(item, tensors)) for key, item in payload]
        return OrderedDict(pairs) if description.get("ordered") else dict(pairs)
    if kind == "enum":
        return _allowed_class(payload)(description["value"])
    if kind == "object":
        instance = object.__new__(_allowed_class(payload))
        instance.__dict__.update(decode(description["fields"], tensors))
        return instance
    raise UnsafeCheckpointError(f"unknown entry {kind!r} in checkpoint structure")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def writable(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors as safetensors writes them: on CPU, contiguous, each alone on its whole storage. Only those
    that are not get copied: a CPU run's checkpoint then holds no second copy of the optimizer in memory
    (a SmolLM2 PPO rank reached 7.1 GB saving when every tensor was copied)."""
    storages, result = set(), {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        alone = (tensor.device.type == "cpu" and tensor.is_contiguous() and storage.data_ptr() not in storages
                 and storage.nbytes() == tensor.numel() * tensor.element_size())
        result[name] = tensor if alone else tensor.to("cpu", copy=True).contiguous()
        if result[name].untyped_storage().data_ptr():  # size 0 tensors share the null pointer harmlessly
            storages.add(result[name].untyped_storage().data_ptr())
    return result


def save_state(state: Any, path: str) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    structure = encode(state, tensors)
    require_finite_tensors(((f"tensor {name}", tensor) for name, tensor in tensors.items()), f"checkpoint file {path}")
    save_file(writable(tensors), path, metadata={STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: str) -> Any:
    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as opened:
            metadata = opened.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise UnsafeCheckpointError(
            f"{path} is not a safetensors checkpoint ({error}); pickled checkpoints are not loaded"
        ) from None
    if STRUCTURE_KEY not in metadata:
        raise UnsafeCheckpointError(f"{path} is a safetensors file but not a rayrlhf checkpoint (no {STRUCTURE_KEY})")
    return decode(json.loads(metadata[STRUCTURE_KEY]), tensors)


class SafetensorsCheckpointEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine interface over save_state / load_state."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "SafetensorsCheckpointEngine"

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        save_state(state_dict, path)

    def load(self, path: str, map_location=None):
        return load_state(path)  # on CPU; DeepSpeed copies into the parameters' devices

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # writable copies what shares storage, so DeepSpeed need not clone anything first


def use_safetensors_checkpoints(engine) -> None:
    """Make a DeepSpeed engine save and load safetensors (the ZeRO optimizers go through the engine's)."""
    engine.checkpoint_engine = SafetensorsCheckpointEngine()
