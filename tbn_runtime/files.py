"""File helpers every package uses: atomic writes and content hashes (standard library only)."""

import hashlib
import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename it to path: readers never see half a file.

    The temporary file sits beside the target (same file system, so the rename is atomic) under
    a hidden name; it is removed if write fails.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
