"""Checkpoints are safetensors: every ZeRO stage resumes exactly, and a pickled file is refused unopened."""
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

from rayrlhf.errors import TrainingDivergedError
from rayrlhf.models.build import save_model
from rayrlhf.training.finite import require_finite_losses
from rayrlhf.training.safe_checkpoints import UnsafeCheckpointError, load_state, save_state, writable

from helpers import tiny_rm


def test_a_nested_state_round_trips(tmp_path):
    base = torch.arange(6.0)
    state = {
        "module": OrderedDict(weight=base.view(2, 3), bias=base[:2]),  # views of one storage
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, dtype=torch.bfloat16)}},
        "param_shapes": [OrderedDict(weight=torch.Size([2, 3]))],
        "names": {"a", "b"}, "pair": (1, "x"), "none": None, "flag": True, "lr": 1e-3, "dtype": torch.float16,
        "loss_scaler": DynamicLossScaler(init_scale=8.0, scale_window=100, min_scale=1.0, delayed_shift=2, consecutive_hysteresis=False),
    }
    save_state(state, str(tmp_path / "s.pt"))
    loaded = load_state(str(tmp_path / "s.pt"))
    assert torch.equal(loaded["module"]["weight"], base.view(2, 3)) and torch.equal(loaded["module"]["bias"], base[:2])
    assert isinstance(loaded["module"], OrderedDict)
    assert list(loaded["state"]) == [0] and loaded["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert loaded["param_shapes"][0]["weight"] == torch.Size([2, 3])
    assert loaded["names"] == {"a", "b"} and loaded["pair"] == (1, "x") and loaded["dtype"] == torch.float16
    assert (loaded["none"], loaded["flag"], loaded["lr"]) == (None, True, 1e-3)
    assert type(loaded["loss_scaler"]) is DynamicLossScaler and vars(loaded["loss_scaler"]) == vars(state["loss_scaler"])


class NotAllowed:
    pass


def test_a_class_off_the_allow_list_is_refused_when_saving(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match=r"state\['optimizer'\]\['hook'\].*NotAllowed"):
        save_state({"optimizer": {"hook": NotAllowed()}}, str(tmp_path / "s.pt"))


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # unpickling this creates the marker file


def test_a_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    marker, planted = tmp_path / "ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, planted)
    with pytest.raises(UnsafeCheckpointError, match="not a safetensors checkpoint"):
        load_state(str(planted))
    assert not marker.exists()


def is_safetensors(path: Path) -> bool:
    header = path.read_bytes()[:9]
    return len(header) == 9 and header[8:9] == b"{"  # 8-byte header length, then the JSON header


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_resumes_exactly_from_safetensors(distributed, tmp_path, zero_stage):
    """Save after step 1, load into a fresh engine, take steps 2-3 in both: the parameters agree, so the
    optimizer state came back too (Adam's moments change step 2's update)."""
    (first, *rest) = tiny_rm.global_batches()
    continuing = tiny_rm.make_trainer(zero_stage)
    continuing.metarm_step(*first)
    continuing.engine.save_checkpoint(str(tmp_path / "ckpt"), tag="state")
    files = list((tmp_path / "ckpt").rglob("*.pt"))
    assert files and all(is_safetensors(p) for p in files), files

    resumed = tiny_rm.make_trainer(zero_stage)
    resumed.engine.load_checkpoint(str(tmp_path / "ckpt"), tag="state")
    for batches in rest:
        continuing.metarm_step(*batches)
        resumed.metarm_step(*batches)
    expected, actual = continuing.full_parameters(), resumed.full_parameters()
    assert max((actual[name] - expected[name]).abs().max().item() for name in expected) < 1e-6


def test_only_tensors_that_share_storage_or_are_views_are_copied_for_writing():
    whole, other = torch.arange(6.0), torch.ones(3)
    written = writable({"whole": whole, "view": whole[2:4], "again": whole, "other": other, "strided": other[::2]})
    assert written["whole"].data_ptr() == whole.data_ptr() and written["other"].data_ptr() == other.data_ptr()
    for name in ("view", "again", "strided"):  # copied: safetensors refuses shared or partial storage
        assert written[name].untyped_storage().data_ptr() not in (whole.data_ptr(), other.data_ptr())
    assert written["view"].tolist() == [2.0, 3.0] and written["strided"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_state_with_a_non_finite_tensor_is_never_written(tmp_path, bad):
    state = {"module": {"weight": torch.tensor([1.0, bad]), "step": torch.tensor(3)}}
    with pytest.raises(TrainingDivergedError, match=r"checkpoint file .*state\.pt: non-finite values in tensor 0; nothing was written"):
        save_state(state, str(tmp_path / "state.pt"))
    assert not (tmp_path / "state.pt").exists()


def test_a_model_with_a_non_finite_weight_is_never_saved(tmp_path):
    _, tokenizer = tiny_rm.task_and_tokenizer()
    model = tiny_rm.tiny_reward_model(tokenizer)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="non-finite values in"):
        save_model(model, tokenizer, tmp_path / "rm")
    assert not (tmp_path / "rm").exists() and not (tmp_path / "rm.tmp").exists()


def test_a_non_finite_loss_stops_the_step_naming_it():
    require_finite_losses({"loss": 0.5, "accuracy": 1.0}, "reward-model step")
    with pytest.raises(TrainingDivergedError, match=r"^PPO policy update: loss = nan; the step was not taken"):
        require_finite_losses({"loss": float("nan"), "clip_fraction": 0.1}, "PPO policy update")
