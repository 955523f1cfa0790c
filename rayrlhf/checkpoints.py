"""Round checkpoints in a run directory: written under a temporary name, renamed into place, pruned.

    run_dir/checkpoints/round_0002/state.json        the driver's state (round, KL coefficient, history)
    run_dir/checkpoints/round_0002/reward_model/     the RM engine (weights + optimizer), every rank's part
    run_dir/checkpoints/round_0002/ppo/{policy,critic}/

A crash or Ctrl-C while writing leaves only `round_0003.tmp`, which the next write removes; the last
complete checkpoint stays loadable. Round 0 is the state after SFT and the initial RM and is always kept.
state.json, written last, carries the sha256 of every other file (its manifest, `files`): a checkpoint damaged
later (a file cut, deleted or changed) is found and named, and resume takes the newest intact one.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from rayrlhf.errors import naming_the_file

PREFIX, STAGING = "round_", ".tmp"
MANIFEST = "files"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, round_index: int) -> Path:
    return checkpoint_root(run_dir) / f"{PREFIX}{round_index:04d}"


def round_of(checkpoint: Path) -> int:
    """The round a checkpoint folder holds (round_0002 -> 2)."""
    return int(Path(checkpoint).name[len(PREFIX):])


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Finished checkpoints, oldest first (staging folders excluded)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(STAGING) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def begin_checkpoint(run_dir: Path, round_index: int) -> Path:
    """A fresh staging folder for round_index (a leftover from an interrupted write is removed)."""
    staging = checkpoint_path(run_dir, round_index).with_name(checkpoint_path(run_dir, round_index).name + STAGING)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit_checkpoint(staging: Path, state: dict, keep: int) -> Path:
    """Write state.json (with the other files' checksums) last, rename the staging folder into place, drop all but
    round 0 and the last `keep`."""
    state = {**state, MANIFEST: file_checksums(staging)}
    with naming_the_file(staging / "state.json"):
        (staging / "state.json").write_text(json.dumps(state, indent=1))
    final = staging.with_name(staging.name.removesuffix(STAGING))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    older = [p for p in complete_checkpoints(final.parent.parent) if p.name != f"{PREFIX}0000"]
    for stale in older[:-keep]:
        shutil.rmtree(stale)
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def file_checksums(folder: Path) -> Dict[str, str]:
    """sha256 of every file under `folder` but state.json (relative path -> hex digest)."""
    return {str(f.relative_to(folder)): _sha256(f) for f in sorted(Path(folder).rglob("*"))
            if f.is_file() and f.name != "state.json"}


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def damage(checkpoint: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint (state.json unreadable, a file missing or changed since it was
    written), or None when it is intact. A checkpoint from before manifests were written is taken as intact."""
    try:
        manifest = read_state(checkpoint).get(MANIFEST, {})
    except (OSError, ValueError) as error:
        return f"state.json cannot be read ({error})"
    for name, digest in manifest.items():
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} has changed since it was written (its sha256 differs from the manifest's)"
    return None


def latest_intact_checkpoint(run_dir: Path) -> Tuple[Optional[Path], List[str]]:
    """The newest complete checkpoint that is intact, and one line naming each newer one that is damaged."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append(f"checkpoint {checkpoint} is damaged: {problem}")
    return None, damaged


def read_files(folder: Path) -> Dict[str, bytes]:
    """Every file under `folder` (relative path -> content): a checkpoint sent between nodes as bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in Path(folder).rglob("*") if f.is_file()}


def write_files(folder: Path, files: Dict[str, bytes]) -> None:
    """The inverse of read_files: each file written under `folder`, folders made as needed."""
    for name, content in files.items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
