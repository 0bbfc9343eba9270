"""An on-disk cache of decoded datasets: one uncompressed .npz per (source, options, file listing).

The key hashes everything that determines the decoded arrays, including a
fingerprint of the source files (relative path, size, modification time), so
an edited, added or removed file misses the cache instead of returning stale
data. Each entry also stores a checksum of its arrays (``gujax.files.checksum``,
the ``__checksum__`` member): an entry that is truncated, garbled or whose
arrays no longer match it is reported in one warning and recomputed, never
used.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from typing import Any, Iterable

import numpy as np

from gujax import files

# Bump when the decoded layout changes, so old entries are never read.
# 2: entries carry the checksum of their arrays.
FORMAT_VERSION = 2
_CHECKSUM = "__checksum__"


class CacheWarning(UserWarning):
    """A cache entry could not be used (damaged): it is recomputed."""


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


def path_of(cache_dir: pathlib.Path, key: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"{key}.npz"


def read(cache_dir: pathlib.Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, or None if absent, unreadable or not
    matching their checksum (one ``CacheWarning`` naming the file; the
    caller recomputes and rewrites the entry)."""
    path = path_of(cache_dir, key)
    if not path.exists():
        return None
    try:
        arrays = files.load_npz(path)
        saved = arrays.pop(_CHECKSUM, None)
        if saved is None:
            raise files.CorruptFile(path, "no checksum: cut short, or written by an older gujax")
        if str(saved) != files.checksum(arrays):
            raise files.CorruptFile(path, "its arrays do not match their checksum")
    except files.CorruptFile as err:
        warnings.warn(f"cache file {path} is damaged ({err.reason}); recomputing it",
                      CacheWarning, stacklevel=3)
        return None
    return arrays


def write(cache_dir: pathlib.Path, key: str, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    """Stores ``arrays`` and their checksum under ``key`` atomically (temp
    file + rename)."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = path_of(cache_dir, key)
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    files.save_npz(path, **arrays, **{_CHECKSUM: np.asarray(files.checksum(arrays))})
    return path
