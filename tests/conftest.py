import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SHARED = ROOT.parent / "shared"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rayrlhf" / "torch_extensions"))


def data_file(*parts: str) -> Path:
    """A file in the repository's data/ folder (data/README.md). It ships with the project, so a missing one
    fails the test rather than skipping it."""
    path = DATA.joinpath(*parts)
    assert path.is_file(), f"{path} is missing: the real preference data ships in the repository's data/ folder"
    return path


def shared_file(*parts: str) -> Path:
    """A file under ../shared (the tokenizers), or a clean skip when the folder is absent (e.g. outside this
    workplace)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real tokenizers live in ../shared beside the project")
    return path


@pytest.fixture(scope="session")
def distributed():
    """One gloo process group for the tests that build DeepSpeed engines in this process."""
    from rayrlhf.training.distributed import init_distributed

    init_distributed("cpu")


def child_env() -> dict:
    """This process's environment minus the process-group variables `distributed` set, so a child
    process (a CLI run, torchrun) forms its own group on its own port."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    return {key: value for key, value in os.environ.items() if key not in names}


def pytest_sessionfinish(session, exitstatus):
    """Write the fault table the fault tests recorded, when asked to (see tests/helpers/fault_table.py)."""
    from helpers import fault_table

    target = os.environ.get("RAYRLHF_FAULT_TABLE")
    if target and fault_table.ROWS:
        fault_table.write(Path(target))
