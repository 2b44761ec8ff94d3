"""A data file's content hash, computed once and trusted while the file is untouched.

A warm start must not re-read a multi-gigabyte file just to learn that it has not changed. The first time a
file is seen its sha256 is computed and stored under ``$TUNEFORGE_HOME/cache/tokens/files/`` together with
what ``stat`` says (size, mtime in ns, inode); later the hash is trusted as long as ``stat`` says the same —
one system call instead of a full read. What invalidates it:

* any change of size, mtime or inode (an edit, a copy over it, ``touch``) → the file is hashed again;
* a file modified within ``RACY_S`` seconds of being hashed is hashed again every time (as git does for its
  index: an edit in the same mtime tick would otherwise go unnoticed);
* ``verify=True`` (``data.verify`` / ``tuneforge train --verify``) always hashes, catching an edit that kept
  size and mtime; without it, :func:`verify_in_background` re-hashes after a trusted hit and drops the record
  when the content changed, so the *next* start prepares the data afresh.

A ``datasets.save_to_disk`` directory hashes as all its files (relative names and contents) in sorted order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from tuneforge.data.readers import SUPPORTED
from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_write
from tuneforge.paths import cache_dir

log = logging.getLogger(__name__)

RACY_S = 2.0
CHUNK = 1 << 22


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _stat(path: Path) -> list[list[int]]:
    out = []
    for p in _files(path):
        st = p.stat()
        out.append([st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def content_digest(path: Path) -> str:
    """sha256 of the file's bytes (a directory: every file's relative name and bytes, in sorted order)."""
    h = hashlib.sha256()
    for p in _files(path):
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _record_path(path: Path) -> Path:
    return cache_dir("tokens") / "files" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def file_digest(path: str | Path, *, verify: bool = False) -> tuple[str, bool]:
    """``(sha256, trusted)``: the content hash, and whether it came from the stored record without a read."""
    p = Path(path).resolve()
    if not p.exists():
        raise TuneforgeError(f"{path}: no such file or directory (supported data: {SUPPORTED})")
    record = _record_path(p)
    stat = _stat(p)
    if not verify:
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):
            known = None
        newest = max((mtime for _, mtime, _ in stat), default=0)
        if known and known["stat"] == stat and newest < known["hashed_at_ns"] - RACY_S * 1e9:
            return known["sha256"], True
    hashed_at = time.time_ns()
    digest = content_digest(p)
    if _stat(p) == stat:  # not changing under us: the pair (stat, digest) is consistent
        atomic_write(record, json.dumps({"path": str(p), "stat": stat, "sha256": digest, "hashed_at_ns": hashed_at}))
    return digest, False


def verify_in_background(path: str | Path, expected: str) -> threading.Thread:
    """Re-hash `path` in a daemon thread; if it no longer matches, forget the record (and say so)."""

    def run() -> None:
        p = Path(path).resolve()
        try:
            if content_digest(p) != expected:
                _record_path(p).unlink(missing_ok=True)
                log.warning(
                    "%s changed without a change of size or mtime; this run uses its cached tokens, "
                    "the next start prepares it afresh (or run with --verify)",
                    p,
                )
        except OSError:
            pass  # the file went away: the next start reports it

    thread = threading.Thread(target=run, name=f"verify:{os.path.basename(path)}", daemon=True)
    thread.start()
    return thread
