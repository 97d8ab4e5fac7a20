"""The one atomic file writer: a reader sees the old file or the new one, never half of one.

Used for the state directory's JSON files and the metrics textfile. The data goes to a fresh
temporary file in the same directory (``mkstemp``: O_EXCL, so a planted link is never followed;
its name starts with a dot and ends in ``.tmp``, so collectors that read ``*.prom`` skip it),
gets its mode (whatever the umask) and optionally the directory's owner, is optionally synced,
and is renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes, *, mode: int, owner_like_dir: bool = False,
                 durable: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically, with permission bits ``mode``.

    ``owner_like_dir``: give the file the directory's owner and group where this process may
    (root always; another user keeps its own when the kernel refuses). ``durable``: fsync the
    data before the rename. OSError is the caller's, naming ``path`` (never the temporary
    name, so the same failure reads the same each time); no temporary file is left behind.
    """
    try:
        _write(path, data, mode, owner_like_dir, durable)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _write(path: Path, data: bytes, mode: int, owner_like_dir: bool, durable: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            if owner_like_dir:
                _own_like_dir(fd, path.parent)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _own_like_dir(fd: int, directory: Path) -> None:
    """Give the open file ``directory``'s owner and group, where this process may."""
    want = os.stat(directory)
    have = os.fstat(fd)
    if (have.st_uid, have.st_gid) == (want.st_uid, want.st_gid):
        return
    with contextlib.suppress(PermissionError):
        os.fchown(fd, want.st_uid, want.st_gid)
