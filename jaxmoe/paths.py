"""Output paths checked before any work starts: each failure is one `ConfigError` line naming the
path, the flag that gave it and the fix."""

import errno
import os
import tempfile
from pathlib import Path
from typing import NoReturn

from jaxmoe.config import ConfigError


def writable_dir(path: Path, flag: str) -> Path:
    """`path` as a directory this process can create files in (made if missing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory; name a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _refuse(path, flag, err)
    _probe(path, path, flag)
    return path


def writable_file(path: Path, flag: str) -> Path:
    """`path` as a file this process may write (its directory exists and takes files; the file
    itself, if there, is a regular file it may overwrite). Nothing is written to `path` (a
    temporary file in its directory comes and goes)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; name a file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a directory; name another path")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} cannot be written (permission denied); {_fix(None)}")
    _probe(parent, path, flag)
    return path


def _probe(directory: Path, path: Path, flag: str) -> None:
    """A temporary file made and removed in `directory`: permissions do not bind root, and some
    file systems (/proc) take no new files, so only trying tells."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        _refuse(path, flag, err)


def _refuse(path: Path, flag: str, err: OSError) -> NoReturn:
    raise ConfigError(f"{flag} {path} cannot be written ({_reason(err)}); {_fix(err)}") from None


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _fix(err: OSError | None) -> str:
    if err is not None and err.errno == errno.ENOSPC:
        return "free space on that disk or name a path on another"
    return "name a path you may write, or fix its permissions"
