"""The run dir: checked writable before anything starts, and written by one run at a time (an advisory lock on
run_dir/.lock, held from before the first write to the end of the run).

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


def check_run_dir_writable(run_dir: Path) -> None:
    """A ConfigError when run_dir cannot be made or written: a file in the way, or a folder (it, or the nearest one
    above it that exists) that cannot be written (a read-only mount, no permission). Creates nothing."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"run_dir {str(run_dir)!r}: {str(folder)!r} is a file, not a folder; choose another run_dir")
    existing = next(folder for folder in (run_dir, *run_dir.parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {str(run_dir)!r} cannot be written ({str(existing)!r} is read-only or not ours); "
                          "choose another run_dir")


class RunDirLock:
    """`with RunDirLock(run_dir) as lock:` takes run_dir's lock at once where the folder exists, so a run already
    writing it is refused before anything starts (ConfigError naming it); `lock.acquire()` creates a new folder and
    takes the lock before the first write. Released on leaving the block."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.handle = None

    def __enter__(self) -> "RunDirLock":
        if self.path.parent.is_dir():
            self.acquire()
        return self

    def acquire(self) -> bool:
        """Hold the lock (creating the folder where needed); True when it was not held before."""
        if self.handle is not None:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as error:
            raise ConfigError(f"run_dir {str(self.path.parent)!r} cannot be written: {error.strerror or error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(read_holder(self.path))
            handle.close()
            raise ConfigError(f"run_dir {str(self.path.parent)!r} is in use by another run ({holder}); wait for it to "
                              "end or stop it, or choose another run_dir (two runs writing one folder would mix their "
                              "metrics and checkpoints)") from None
        self.handle = handle
        previous = read_holder(self.path)
        if previous:
            logger.warning("run_dir %s: the run that held it last (%s) ended without releasing it (killed?); taking it over",
                           self.path.parent, describe_holder(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
        handle.flush()
        return True

    def __exit__(self, *exc_info) -> None:
        if self.handle is None:
            return
        self.handle.seek(0)
        self.handle.truncate()  # an empty file: released cleanly
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


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
