"""A bytecode cache for the suite's child processes when bytecode writing is off.

With ``PYTHONDONTWRITEBYTECODE`` set (shared machines and many CI images set it),
every Python process the suite starts — ``node start``, each CLI run, each
benchmark and worker process — compiles every module it imports from source
again: a few tenths of a second of CPU per process, hundreds of times a run.
:func:`enable_for_children` points the children at one bytecode cache outside the
source tree instead (``PYTHONPYCACHEPREFIX``), so nothing is written next to the
sources, which is what the setting is usually for, and each module is compiled
once per run rather than once per process.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import MutableMapping
from pathlib import Path


def private_cache_dir(base: Path) -> Path | None:
    """``base/medledger-test-pycache-<uid>``, made owner-only; ``None`` if it is not ours.

    Bytecode found there is executed, so a directory another user made or could write
    (a shared temporary directory) is never used.
    """
    path = base / f"medledger-test-pycache-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError:
        return None
    owned = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    if not owned or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return path


def enable_for_children(environ: MutableMapping[str, str], base: Path | None = None) -> Path | None:
    """Give child processes a private bytecode cache (in ``base``, by default the temporary
    directory) if ``environ`` turns bytecode off.

    Returns the cache directory it set, ``None`` if it changed nothing (bytecode is
    written anyway, a cache prefix is already chosen, or no private directory exists).
    """
    if not environ.get("PYTHONDONTWRITEBYTECODE") or environ.get("PYTHONPYCACHEPREFIX"):
        return None
    cache = private_cache_dir(Path(tempfile.gettempdir()) if base is None else base)
    if cache is None:
        return None
    del environ["PYTHONDONTWRITEBYTECODE"]
    environ["PYTHONPYCACHEPREFIX"] = str(cache)
    return cache
