"""An on-disk cache of decoded datasets: one uncompressed .npz per (source, options, file listing).

The key hashes everything that determines the decoded arrays, including a
fingerprint of the source files (relative path, size, modification time), so
an edited, added or removed file misses the cache instead of returning stale
data.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from typing import Any, Iterable

import numpy as np

# Bump when the decoded layout changes, so old entries are never read.
FORMAT_VERSION = 1


def default_cache_dir() -> pathlib.Path:
    """``$GUJAX_CACHE`` if set, else ``~/.cache/gujax``."""
    return pathlib.Path(os.environ.get("GUJAX_CACHE", pathlib.Path.home() / ".cache" / "gujax"))


def file_listing(paths: Iterable[pathlib.Path], root: pathlib.Path) -> list[tuple[str, int, int]]:
    """(path relative to root, size in bytes, mtime in ns) for each file, in the given order."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return out


def cache_key(**fields: Any) -> str:
    """A hex digest of the JSON-encoded fields (sorted keys) and FORMAT_VERSION."""
    text = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read(cache_dir: pathlib.Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, or None if absent or unreadable."""
    path = pathlib.Path(cache_dir) / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as err:  # a half-written or damaged entry: rebuild it
        warnings.warn(f"ignoring unreadable cache file {path}: {err}")
        return None


def write(cache_dir: pathlib.Path, key: str, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """Stores ``arrays`` under ``key`` atomically (temp file + rename)."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.npz"
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
