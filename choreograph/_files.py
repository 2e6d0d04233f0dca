"""Files and directories the framework creates are the owner's alone.

A bus file, a service store or a recorder database holds business data, and the demo's settings
file a broker URL: created 0600, in directories created 0700. Existing files and directories are
left as they are (their owner chose their mode).
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """Create ``path`` and its missing parents as 0700 directories (``mkdir -p``, owner-only)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another process: its mode is its own
            continue
        os.chmod(directory, DIR_MODE)  # mkdir's mode is cut by the umask; this is exact
    return path


def private_file(path: str | Path) -> Path:
    """Create ``path`` empty and 0600 (its directory 0700) unless it exists.

    SQLite opens an existing empty file as a new database and gives its ``-wal`` and ``-shm``
    files the database file's mode, so a database created here stays owner-only.
    """
    path = Path(path)
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path
