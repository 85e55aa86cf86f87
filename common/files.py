"""Small file-system questions asked by several commands."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["same_file"]


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
