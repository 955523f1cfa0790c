"""Round checkpoints carry the checksums of their files: a damaged one is named, and resume takes the newest intact
one (rayrlhf/checkpoints.py)."""
import hashlib
import json

import pytest

from rayrlhf.checkpoints import (begin_checkpoint, commit_checkpoint, damage, file_checksums, latest_checkpoint,
                                 latest_intact_checkpoint)
from rayrlhf.config import load_config
from rayrlhf.errors import ConfigError
from rayrlhf.launch import check_run_dir


def write_round(run_dir, round_index: int, content: bytes = b"weights"):
    staging = begin_checkpoint(run_dir, round_index)
    (staging / "ppo" / "policy").mkdir(parents=True)
    (staging / "ppo" / "policy" / "model_states.pt").write_bytes(content * 100)
    (staging / "reward_model").mkdir()
    (staging / "reward_model" / "optim_states.pt").write_bytes(content[::-1])
    return commit_checkpoint(staging, {"round": round_index}, keep=5)


def test_the_manifest_holds_the_sha256_of_every_file_but_the_state(tmp_path):
    checkpoint = write_round(tmp_path, 1)
    manifest = json.loads((checkpoint / "state.json").read_text())["files"]
    assert manifest == {"ppo/policy/model_states.pt": hashlib.sha256(b"weights" * 100).hexdigest(),
                        "reward_model/optim_states.pt": hashlib.sha256(b"sthgiew").hexdigest()}
    assert file_checksums(checkpoint) == manifest and damage(checkpoint) is None


@pytest.mark.parametrize("harm, problem", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "has changed since it was written"),  # cut short
    (lambda f: f.unlink(), "is missing"),
    (lambda f: f.write_bytes(f.read_bytes().replace(b"w", b"W", 1)), "has changed since it was written"),  # one byte
])
def test_a_damaged_latest_checkpoint_is_named_and_the_newest_intact_one_taken(tmp_path, harm, problem):
    for round_index in range(3):
        write_round(tmp_path, round_index)
    harm(tmp_path / "checkpoints" / "round_0002" / "ppo" / "policy" / "model_states.pt")
    intact, damaged = latest_intact_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path).name == "round_0002" and intact.name == "round_0001"
    assert damaged == [f"checkpoint {tmp_path / 'checkpoints' / 'round_0002'} is damaged: ppo/policy/model_states.pt {problem}"
                       + (" (its sha256 differs from the manifest's)" if "changed" in problem else "")]


def test_resume_with_every_checkpoint_damaged_is_refused_naming_them(tmp_path):
    write_round(tmp_path, 0)
    (tmp_path / "checkpoints" / "round_0000" / "state.json").write_text("{cut")
    config = load_config(None, [f"run_dir={tmp_path}", "resume=true"])
    with pytest.raises(ConfigError, match=r"holds no complete, intact checkpoint \(checkpoint .*round_0000 is damaged: "
                                          r"state\.json cannot be read"):
        check_run_dir(config)


def test_a_checkpoint_from_before_manifests_counts_as_intact(tmp_path):
    checkpoint = write_round(tmp_path, 0)
    state = json.loads((checkpoint / "state.json").read_text())
    del state["files"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    assert damage(checkpoint) is None
