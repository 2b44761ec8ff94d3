"""Atomic file writes: a concurrent reader sees the old file or the new one, never a torn one.

Caches, checkpoints, results and generated data are all written this way — write a temporary file in the
same directory (so the final rename stays on one file system), flush it to disk, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; it replaces `path` when the block succeeds.

    For writers that want a file name (``np.save``, ``torch.save``, ``save_file``). On an exception the
    temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, content: str | bytes, *, fsync: bool = True) -> Path:
    """Replace `path` with `content` (text as UTF-8) atomically; returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)
