"""Atomic file writes: every weight, image, sidecar and report this package writes goes through here.

A crash, a full disk or Ctrl-C mid-write then leaves the old file (or nothing) under the real name,
never a truncated one that a later run would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The result gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes
    owner-only files, which would lock other users out of shared weights and results).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for directories: fill the yielded staging directory; it replaces ``path`` on success.

    A leftover staging directory of a killed run is cleared first, so a crash never leaves a
    half-written directory under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
