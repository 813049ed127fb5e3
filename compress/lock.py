"""One `compress run` per run folder at a time: an exclusive `fcntl.flock` on `runs/<name>/.lock`.

The OS releases the lock when its holder exits or crashes, so a lock file left behind never blocks a later
run. The file itself stays (removing it would let a waiting run and a new one lock two different files);
it holds the pid of its last holder, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import RunLockedError

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path, *, wait: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block; RunLockedError at once when it is taken, unless `wait`."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise RunLockedError(
                    f"{run_dir} is in use by another `compress run` (pid {holder}, lock {path}); "
                    "wait for it to finish, or pass --wait to start when it does"
                ) from None
            say(f"waiting for pid {holder}, which holds {path} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"
