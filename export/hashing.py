"""sha256 of checkpoint and engine files: one rule for source identities (build-engine, loading),
engine-folder reuse checks and TensorRT plan keys. Standard library only."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def files_sha256(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """sha256 over the contents of `paths` in sorted order; with `root`, each file's name relative
    to it (POSIX form, NUL-terminated) is hashed before its contents, so renames count too."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        if root is not None:
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return files_sha256([path])


def tree_sha256(folder: str | os.PathLike) -> str:
    """sha256 over every file below `folder`: relative names and contents, in sorted order."""
    folder = Path(folder)
    return files_sha256((p for p in folder.rglob("*") if p.is_file()), root=folder)
