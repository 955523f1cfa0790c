"""The run dir: created writable before anything starts, and written by one run at a time (an advisory lock on
run_dir/.lock, held for the whole run).

The lock is an OS file lock (flock), so it dies with its holder: a run killed with SIGKILL leaves the file behind
but not the lock, and the next run (a resume, say) takes it over with a warning naming the run that left it.
The file records who holds it (host, pid, start time), so a refused run can say who is writing.
"""
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from rayrlhf.errors import ConfigError

LOCK_NAME = ".lock"
logger = logging.getLogger(__name__)


def prepare_run_dir(run_dir: Path) -> None:
    """Create run_dir (and its parents), or a ConfigError saying why it cannot be: a file in the way, or a folder
    that cannot be written (a read-only mount, no permission)."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"run_dir {str(run_dir)!r}: {str(folder)!r} is a file, not a folder; choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run_dir {str(run_dir)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {str(run_dir)!r} cannot be written (read-only or no permission); choose another run_dir")


class RunDirLock:
    """`with RunDirLock(run_dir):` holds run_dir's lock, or raises ConfigError naming the run that holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.handle = None

    def __enter__(self) -> "RunDirLock":
        try:
            self.handle = open(self.path, "a+")
        except OSError as error:
            raise ConfigError(f"run_dir {str(self.path.parent)!r} cannot be written: {error.strerror or error}") from None
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(read_holder(self.path))
            self.handle.close()
            raise ConfigError(f"run_dir {str(self.path.parent)!r} is in use by another run ({holder}); wait for it to "
                              "end or stop it, or choose another run_dir (two runs writing one folder would mix their "
                              "metrics and checkpoints)") from None
        previous = read_holder(self.path)
        if previous:
            logger.warning("run_dir %s: the run that held it last (%s) ended without releasing it (killed?); taking it over",
                           self.path.parent, describe_holder(previous))
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        self.handle.flush()
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.seek(0)
        self.handle.truncate()  # an empty file: released cleanly
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def read_holder(path: Path) -> Optional[dict]:
    """The holder record in a lock file; None when empty (released cleanly) or unreadable."""
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe_holder(holder: Optional[dict]) -> str:
    if not holder:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"
