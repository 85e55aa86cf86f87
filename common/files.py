"""Small file-system helpers shared by several commands: the same-file check and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["same_file", "atomic_write_text", "atomic_write_bytes"]


def same_file(a: str | Path, b: str | Path | None) -> bool:
    """True when two paths name one file: equal once resolved (symlinks followed), or one inode (hard links,
    bind mounts). ``False`` when ``b`` is ``None`` or either path cannot be inspected."""
    if b is None:
        return False
    a, b = Path(a), Path(b)
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be read by the team
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
