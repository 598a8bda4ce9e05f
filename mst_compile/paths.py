"""Checks on the paths a command reads and writes, done before any work and without importing torch.

A folder that cannot be written (permissions, a read-only file system, ``/proc``) is found by
creating and removing a probe file in it, the only test that also holds for root and for read-only
mounts; nothing is created on the way (a run folder that is never used must not appear).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import MstCompileError


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (or its nearest existing ancestor); None when one can."""
    d = folder
    while not d.exists() and d.parent != d:
        d = d.parent
    if not d.is_dir():
        return f"{d} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".mstc-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot create files in {d}: {e.strerror or type(e).__name__}"
    return None


def writable_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or one line saying why it cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise MstCompileError(f"{what} {p} is a folder: pass a file name inside it")
    if p.exists():
        try:
            os.close(os.open(p, os.O_WRONLY))
            return p
        except OSError as e:
            why = e.strerror or type(e).__name__
    else:
        why = _unwritable(p.parent)
    if why:
        raise MstCompileError(f"{what} {p} cannot be written ({why}); choose another path")
    return p


def writable_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or one line saying why files cannot be written into it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MstCompileError(f"{what} {p} is a file, not a folder; choose another path")
    why = _unwritable(p)
    if why:
        raise MstCompileError(f"{what} {p} cannot be written ({why}); choose another path")
    return p

