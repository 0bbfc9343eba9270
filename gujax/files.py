"""The files the framework writes and reads back: every write atomic, every
read naming the file it cannot read.

Writes (``atomic_write``, ``write_json``, ``save_npz``) go to a temporary file
beside the target and are renamed over it (``os.replace``) once complete, so a
run killed during a write leaves the old file or the new one, never half of
one (at worst a stray ``*.tmp``, ignored and overwritten later).

Reads (``read_json``, ``read_jsonl``, ``load_npz``, or any decoder inside
``reading(path)``) turn a truncated, garbled or otherwise undecodable file into
one ``CorruptFile`` that names it and says what to do, instead of the
decoder's own exception (``zipfile.BadZipFile``, ``UnicodeDecodeError``,
``json.JSONDecodeError``, ``EOFError``, ...). A missing file is not corrupt:
``FileNotFoundError`` passes through for the caller to handle.

Caches (``gujax.data.cache``) store ``checksum(arrays)`` with their arrays and
recompute an entry whose arrays no longer match it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Any, Iterator, Mapping

import numpy as np

DEFAULT_REMEDY = "delete it (it is then recomputed)"


class CorruptFile(ValueError):
    """A file the framework wrote cannot be read back: ``path``, what is
    wrong with it (``reason``) and what to do (``remedy``)."""

    def __init__(self, path: str | os.PathLike, reason: str, remedy: str | None = None):
        self.path, self.reason = os.fspath(path), reason
        self.remedy = remedy or DEFAULT_REMEDY
        super().__init__(f"{self.path} is damaged or incomplete ({reason}); {self.remedy}")


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, remedy: str | None = None) -> Iterator[None]:
    """Any exception raised while decoding ``path`` inside the block becomes
    ``CorruptFile(path, ...)``; ``FileNotFoundError`` and ``CorruptFile``
    pass through, and so do ``KeyboardInterrupt`` and ``MemoryError``."""
    try:
        yield
    except (FileNotFoundError, CorruptFile, MemoryError):
        raise
    except Exception as err:
        raise CorruptFile(path, _reason(err), remedy) from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit of
    the block it replaces ``path`` whole, on an exception it is removed."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path: str | os.PathLike, value: Any, **dump_kwargs) -> None:
    """``json.dump(value)`` into ``path``, atomically."""
    with atomic_write(path) as f:
        json.dump(value, f, **dump_kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez(path, **arrays)``, atomically (``path`` is used as given)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def read_json(path: str | os.PathLike, remedy: str | None = None) -> Any:
    """The JSON value in ``path`` (``CorruptFile`` if it does not decode)."""
    with reading(path, remedy), open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike, remedy: str | None = None) -> list[dict]:
    """The records of a JSON-lines file ([] if it does not exist). A last
    line without its newline is a record whose append was cut short (the
    process was killed): it is dropped. Any other line that does not decode
    is a ``CorruptFile``."""
    if not os.path.exists(path):
        return []
    with reading(path, remedy):
        with open(path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        complete, last = lines[:-1], lines[-1]      # last: b"" when the file ends in \n
        records = [json.loads(line.decode("utf-8")) for line in complete if line.strip()]
        if last.strip():
            with contextlib.suppress(ValueError):
                records.append(json.loads(last.decode("utf-8")))
        if not all(isinstance(r, dict) for r in records):
            raise ValueError("a line is not a JSON object")
        return records


def load_npz(path: str | os.PathLike, remedy: str | None = None,
             names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (or those in ``names``, each
    required), read whole (so zip's CRC check sees every byte)."""
    with reading(path, remedy), np.load(path, allow_pickle=False) as data:
        wanted = data.files if names is None else names
        missing = [n for n in wanted if n not in data.files]
        if missing:
            raise KeyError(f"no array {missing[0]!r}")
        return {n: data[n] for n in wanted}


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 over the arrays' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
