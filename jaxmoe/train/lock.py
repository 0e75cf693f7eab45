"""One run per work directory: an exclusive lock on WORKDIR/.lock for the run's lifetime.

The operating system drops the lock when the holder exits, however it exits (SIGKILL included),
so a stale lock never blocks a rerun.
"""

import fcntl
import os
from pathlib import Path

from jaxmoe.config import ConfigError

LOCK_FILE = ".lock"


class WorkdirLock:
    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ConfigError(
                f"--workdir {self.path.parent} is in use by another run (process {holder}); "
                f"wait for it to finish, or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
