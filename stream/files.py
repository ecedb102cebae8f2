"""Files written all or nothing, and their checksums: the worker's checkpoints and the learner's
snapshots both rely on them, so they live once, on the side every other package may import."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write ``path`` all or nothing: ``write`` fills a temporary file next to it (its path is the
    argument), which then replaces ``path`` in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
