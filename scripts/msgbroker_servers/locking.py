"""One changing command at a time (two test runs may call `up` together)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
from collections.abc import Iterator
from pathlib import Path

from .common import RUN_DIR, say

# The lock is taken on a file of this package, which `rm -rf .brokers` cannot pull away from
# under a holder.
SINGLE_LOCK = Path(__file__)


@contextlib.contextmanager
def locked(lock_file: Path = SINGLE_LOCK) -> Iterator[None]:
    """Hold the lock on lock_file; say so when another command holds it."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            say("waiting for another scripts/brokers command to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield
