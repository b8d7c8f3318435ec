"""Atomic file writes: every weight, image, sidecar and report this package writes goes through here.

A crash, a full disk or Ctrl-C mid-write then leaves the old file (or nothing) under the real name,
never a truncated one that a later run would trust.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest parent of ``path`` that exists as a file: no folder can be made there (``out.txt/images``)."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it to ``path`` only if the block succeeds.

    ``exclusive=True`` never replaces an existing ``path``: the move is a hard link, which fails
    with ``FileExistsError`` if the name is taken — also when another process took it a moment
    ago — so two runs writing into one folder can't overwrite each other's results.
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
        if exclusive:
            os.link(tmp, path)
        else:
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


def _finite(value):
    """``value`` with non-finite floats spelled as strings (``"inf"``, ``"-inf"``, ``"nan"``), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_text(value) -> str:
    """Strict JSON (what every parser reads) of ``value``: ``Infinity``/``NaN`` are not JSON.

    Scheduler configs legitimately hold ``-inf`` (DPM-Solver's ``lambda_min_clipped``); those become
    strings. Values the user chose are checked for finiteness before any work, so none reaches here.
    """
    return json.dumps(_finite(value), indent=2, default=str, allow_nan=False) + "\n"
