"""Process-group set-up helpers that need no second process."""
import os
import time

from rayrlhf.training.distributed import STALE_BUILD_LOCK_S, remove_stale_build_locks


def test_a_build_lock_older_than_any_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """A killed build's lock (here under the layout torch uses: DIR/op/lock and DIR/py311_cpu/op/lock)
    would make every later build wait forever; a lock a running build holds must stay."""
    stale = [tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"]
    fresh = tmp_path / "other_op" / "lock"
    for lock in [*stale, fresh]:
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 5
    for lock in stale:
        os.utime(lock, (old, old))
    assert sorted(remove_stale_build_locks(tmp_path)) == sorted(stale)
    assert not any(lock.exists() for lock in stale) and fresh.exists()
