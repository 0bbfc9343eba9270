"""Readers that turn a named dataset into a ``Dataset``, and ``load`` which picks one.

Sources, chosen by ``load(name, split, data_dir=...)`` in this order:

1. ``name == "digits"``: scikit-learn's embedded 8x8 digits (data_dir must be None).
2. ``data_dir/<split>/`` is a directory: an image folder
   ``data_dir/<split>/<class>/<image>.{png,jpg,jpeg}``.
3. ``name`` is "cifar10" or "cifar100" and ``data_dir`` holds the canonical
   "python version" pickled batches (cifar10: data_batch_1..5, test_batch,
   batches.meta; cifar100: train, test, meta).
4. Otherwise TFDS, with ``data_dir`` as the TFDS data directory (None: the
   TFDS default, ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets). gujax never
   downloads: the dataset must already be prepared in array-record format.

When none of them has the data, ``DataNotFound`` (a ``ValueError``) says what
the folder holds (empty, an image folder without the split, something else)
and which layouts are accepted (``accepted_layouts``).
"""
from __future__ import annotations

import os
import pathlib
import pickle
import re
from typing import NamedTuple

import numpy as np
from PIL import Image
from gujax.progress import progress_bar

from gujax.data import cache
from gujax.data.dataset import Dataset

TFDS_NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Every DIGITS_TEST_EVERY-th example of each class (by original position) is a test example.
DIGITS_TEST_EVERY = 5
# Progress bars only for loops long enough to notice.
_PROGRESS_MIN = 2000

_CIFAR_PYTHON = {
    "cifar10": dict(train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names_key=b"label_names", labels_key=b"labels"),
    "cifar100": dict(train=["train"], test=["test"], meta="meta",
                     names_key=b"fine_label_names", labels_key=b"fine_labels"),
}


class Decoded(NamedTuple):
    """What a reader returns: images (N, H, W, C) uint8, labels (N,) int, class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def accepted_layouts(name: str, *, data_dir: str = "data_dir",
                     digits: str = "load('digits', split)") -> str:
    """What a data folder may hold, and the data that needs none. ``data_dir``
    and ``digits`` name the folder argument and the embedded dataset in the
    caller's terms (a command line says ``--data-dir`` and ``--dataset digits``)."""
    tfds_name = name if name in TFDS_NAMES else "cifar10"
    return (f"A {data_dir} may hold an image folder DIR/<split>/<class>/<image>.png|jpg "
            "(DIR/train/..., DIR/test/...), the CIFAR 'python version' batches "
            "(cifar10: data_batch_1..5, test_batch, batches.meta; cifar100: train, test, meta) "
            f"or a TFDS data dir (DIR/{tfds_name}/<version>/, prepared in array-record format "
            f"on a machine with network, e.g. `tfds build {tfds_name} "
            "--file_format=array_record`: gujax never downloads); "
            f"or use the embedded {digits}, which needs no files.")


class DataNotFound(ValueError):
    """``load`` found no data where it looked. ``problem`` says where it looked
    and what it found there; the message adds ``accepted_layouts(name)``."""

    def __init__(self, problem: str, name: str):
        self.problem, self.name = problem, name
        super().__init__(f"{problem} {accepted_layouts(name)}")


def _describe_folder(root: pathlib.Path, name: str, split: str) -> str | None:
    """Why ``root`` is not a data folder for (name, split), or None if it may
    be a TFDS data dir (it holds ``<name>/``)."""
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return f"data folder {root} is empty."
    if (root / name).is_dir():
        return None
    splits = [e for e in entries if (root / e).is_dir() and e in ("train", "test", "validation")]
    if splits:
        return (f"data folder {root} looks like an image folder but has no {split}/ folder "
                f"(it has {', '.join(e + '/' for e in splits)}).")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return (f"data folder {root} holds none of the accepted layouts for {name!r} split "
            f"{split!r} (it has {shown}).")


# ----------------------------------------------------------------------------- digits

def read_digits(split: str) -> Decoded:
    """scikit-learn's 1,797 8x8 digits, split deterministically by class.

    Pixel values 0..16 are scaled to uint8 by ``round(v * 255 / 16)`` (so 16 ->
    255; ``round(u * 16 / 255)`` recovers v exactly). Within each class, the
    examples at within-class positions 0, 5, 10, ... (original order) form the
    test split (364 examples: ceil(n_c / 5) of each class's n_c), the rest the
    train split (1,433). No randomness: the split is the same everywhere.
    """
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow

    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test'; got {split!r}")
    bunch = load_digits()
    values, labels = bunch.images, bunch.target
    rank_in_class = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank_in_class[members] = np.arange(len(members))
    is_test = rank_in_class % DIGITS_TEST_EVERY == 0
    keep = is_test if split == "test" else ~is_test
    images = np.rint(values[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Decoded(images, labels[keep], tuple(str(n) for n in bunch.target_names))


# ----------------------------------------------------------------------------- image folder

class ImageFolder(NamedTuple):
    """The listing of one split of an image folder, in load order."""

    paths: list[str]
    labels: np.ndarray  # (N,) int32
    class_names: tuple[str, ...]
    listing: list[tuple[str, int, int]]  # (path relative to root, size, mtime_ns): cache key


def list_image_folder(root: pathlib.Path, split: str) -> ImageFolder:
    """Files of ``root/split/<class>/`` in load order, their labels and the class names.

    Class names are the sorted union of the class directories of every split
    directory under ``root``, so a label means the same class in every split
    even if one split lacks a class. Files are those with a .png/.jpg/.jpeg
    suffix (any case), sorted by class and then by file name (string order:
    zero-pad numbers). Other files are ignored.
    """
    class_names = sorted({c.name for s in root.iterdir() if s.is_dir()
                          for c in s.iterdir() if c.is_dir()})
    paths, labels, listing = [], [], []
    for label, name in enumerate(class_names):
        directory = root / split / name
        if not directory.is_dir():
            continue
        # os.scandir, not pathlib: listing 50,000 files measured 2.5x faster.
        with os.scandir(directory) as it:
            entries = sorted((e for e in it if e.is_file()
                              and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES),
                             key=lambda e: e.name)
        for entry in entries:
            stat = entry.stat()
            paths.append(entry.path)
            listing.append((f"{split}/{name}/{entry.name}", stat.st_size, stat.st_mtime_ns))
        labels += [label] * len(entries)
    if not paths:
        raise ValueError(f"no .png/.jpg images found under {root / split}/<class>/")
    return ImageFolder(paths, np.asarray(labels, np.int32), tuple(class_names), listing)


def decode_image(path: str) -> np.ndarray:
    """One image file -> (H, W, C) uint8, C = 1 for grayscale files, else 3 (RGB).

    Raises ValueError naming the file when it is truncated, corrupt, not an
    image, or has more than 8 bits per channel (converting would clip it).
    """
    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                raise ValueError(f"pixel mode {image.mode} (16-bit or float) is not supported")
            gray = image.mode in ("1", "L", "LA")
            array = np.asarray(image.convert("L" if gray else "RGB"))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"cannot decode image file {path}: {type(err).__name__}: {err}") from None
    return array[..., None] if gray else array


def decode_images(paths: list[str]) -> np.ndarray:
    """Decodes image files with Pillow into (N, H, W, C) uint8, in order.

    All images must have the same height and width. If some files are
    grayscale and others colour, grayscale ones are repeated to 3 channels.
    One thread: for small images the per-file cost is Python overhead under
    the GIL, and a thread pool measured slower here (see docs/data.md).
    """
    arrays = [decode_image(path) for path in progress_bar(
        paths, desc="decoding images", disable=len(paths) < _PROGRESS_MIN, leave=False)]
    height, width = arrays[0].shape[:2]
    for path, array in zip(paths, arrays):
        if array.shape[:2] != (height, width):
            raise ValueError(f"image file {path} is {array.shape[1]}x{array.shape[0]} (WxH) but "
                             f"{paths[0]} is {width}x{height}; all images must share a size")
    channels = max(a.shape[-1] for a in arrays)
    return np.stack([np.repeat(a, channels // a.shape[-1], axis=-1) for a in arrays])


# ----------------------------------------------------------------------------- CIFAR python

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts but refuses any other global (pickle can run code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: pathlib.Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"cannot read CIFAR batch file {path}: {type(err).__name__}: {err}") from None


def cifar_python_files(name: str, split: str) -> list[str] | None:
    """Batch file names holding ``split`` plus the meta file; None if not a CIFAR python split."""
    spec = _CIFAR_PYTHON.get(name)
    if spec is None or split not in ("train", "test"):
        return None
    return spec[split] + [spec["meta"]]


def read_cifar_python(root: pathlib.Path, name: str, split: str) -> Decoded:
    """The canonical CIFAR-10 / CIFAR-100 (fine labels) python batches, in file order.

    Each batch stores ``data`` (N, 3072) uint8, rows of 1024 red, 1024 green,
    1024 blue values in row-major order; they become (N, 32, 32, 3).
    """
    spec = _CIFAR_PYTHON[name]
    images, labels = [], []
    for file in spec[split]:
        batch = _unpickle(root / file)
        data = np.asarray(_entry(batch, b"data", root / file), np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{root / file}: data must be (N, 3072); got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(_entry(batch, spec["labels_key"], root / file), np.int32))
        if len(labels[-1]) != len(images[-1]):
            raise ValueError(f"{root / file}: {len(images[-1])} images but {len(labels[-1])} labels")
    meta = _unpickle(root / spec["meta"])
    names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                  for n in _entry(meta, spec["names_key"], root / spec["meta"]))
    return Decoded(np.concatenate(images), np.concatenate(labels), names)


def _entry(batch, key: bytes, path: pathlib.Path):
    """``batch[key]`` of an unpickled CIFAR file, or a ValueError naming the file."""
    if not isinstance(batch, dict) or key not in batch:
        raise ValueError(f"cannot read CIFAR batch file {path}: it holds no {key.decode()!r} "
                         "entry (not a CIFAR python batch, or damaged)")
    return batch[key]


# ----------------------------------------------------------------------------- TFDS

def open_tfds(name: str, split: str, data_dir: pathlib.Path | None):
    """``tfds.data_source`` without download; ``DataNotFound`` if it is unavailable."""
    import tensorflow_datasets as tfds  # deferred: importing TFDS takes seconds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # TFDS reports an unprepared dataset in many ways
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        # TFDS's own words for a folder without the dataset (e.g. "Random access
        # data source for file format FileFormat.TFRECORD is not supported")
        # only confuse; say what the folder holds instead.
        folder = pathlib.Path(where).expanduser()
        found = (_describe_folder(folder, name, split) if folder.is_dir()
                 else f"data folder {folder} does not exist.")
        reason = str(err).splitlines()[0] if str(err) else ""
        raise DataNotFound(
            f"TFDS dataset {name!r} split {split!r} is not available offline in {where}: "
            + (found or f"{type(err).__name__}: {reason}."), name) from None


def tfds_files(source) -> list[pathlib.Path]:
    """The prepared files behind a TFDS data source (empty under ``tfds.testing.mock_data``)."""
    info = source.dataset_info
    directory = pathlib.Path(info.data_dir)
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{info.name}-{source.split}.*"))


def read_tfds(source) -> Decoded:
    """Every example of a TFDS data source in its record order (features 'image' and 'label')."""
    n = len(source)
    if n == 0:
        raise ValueError(f"TFDS split {source.split!r} is empty")
    i = 0
    try:
        first = source[0]
        images = np.empty((n, *np.shape(first["image"])), np.uint8)
        labels = np.empty((n,), np.int32)
        for i in progress_bar(range(n), desc=f"reading TFDS {source.dataset_info.name}",
                              disable=n < _PROGRESS_MIN, leave=False):
            item = first if i == 0 else source[i]
            images[i] = item["image"]
            labels[i] = item["label"]
        names = tuple(source.dataset_info.features["label"].names)
    except Exception as err:  # a damaged record file: name the files behind the split
        where = ", ".join(str(p) for p in tfds_files(source)) or source.dataset_info.data_dir
        reason = " ".join(str(err).split())[:100]
        raise ValueError(f"cannot decode record {i} of TFDS {source.dataset_info.name} split "
                         f"{source.split!r} ({where}): {type(err).__name__}: {reason}") from None
    return Decoded(images, labels, names)


# ----------------------------------------------------------------------------- load

def _dataset(decoded: Decoded, name: str, split: str) -> Dataset:
    return Dataset(images=np.asarray(decoded.images, np.uint8),
                   labels=np.asarray(decoded.labels, np.int32),
                   ids=np.arange(len(decoded.images), dtype=np.int64),
                   class_names=tuple(decoded.class_names), name=name, split=split)


def _cached(cache_dir, key: str, read) -> Decoded:
    hit = cache.read(cache_dir, key)
    if hit is not None and {"images", "labels", "class_names"} <= set(hit):
        return Decoded(hit["images"], hit["labels"], tuple(str(c) for c in hit["class_names"]))
    decoded = read()
    cache.write(cache_dir, key, {"images": decoded.images, "labels": decoded.labels,
                                 "class_names": np.asarray(decoded.class_names, dtype=str)})
    return decoded


def load(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads one split of a labelled image dataset into memory.

    Args:
      name: "digits" (embedded), a TFDS name (cifar10, cifar100, mnist,
        fashion_mnist, svhn_cropped), or any name for an image folder.
      split: a plain split name such as "train" or "test". Slices like
        "train[:10%]" are refused: ids must refer to the full split (use
        ``gujax.data.splits`` to take subsets).
      data_dir: where the data lives; see the module docstring for how it is
        interpreted (image folder, CIFAR python batches, TFDS data dir).
      cache_dir: where decoded arrays are cached (default
        ``$GUJAX_CACHE`` or ~/.cache/gujax). Digits is never cached.

    Returns:
      A ``Dataset`` whose ids are positions 0..N-1 in the split's fixed order.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string; got {name!r}")
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split must be a plain split name like 'train' (no slicing); got {split!r}")
    if name == "digits":
        if data_dir is not None:
            raise ValueError("digits is embedded in scikit-learn; do not pass data_dir")
        return _dataset(read_digits(split), name, split)

    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else cache.default_cache_dir()
    root = pathlib.Path(data_dir).expanduser().resolve() if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise DataNotFound(f"data folder {data_dir} is not a directory.", name)

    if root is not None and (root / split).is_dir():
        folder = list_image_folder(root, split)
        key = cache.cache_key(source="image_folder", path=root, name=name, split=split,
                              classes=folder.class_names, files=folder.listing)
        read = lambda: Decoded(decode_images(folder.paths), folder.labels, folder.class_names)
        return _dataset(_cached(cache_dir, key, read), name, split)

    files = cifar_python_files(name, split)
    if root is not None and files and all((root / f).is_file() for f in files):
        key = cache.cache_key(source="cifar_python", path=root, name=name, split=split,
                              files=cache.file_listing([root / f for f in files], root))
        return _dataset(_cached(cache_dir, key, lambda: read_cifar_python(root, name, split)),
                        name, split)

    if name not in TFDS_NAMES:
        found = (_describe_folder(root, name, split) or f"data folder {root} has no {split}/ "
                 "folder.") if root else "no data folder was given."
        raise DataNotFound(f"unknown dataset {name!r}: {found} TFDS names: "
                           f"{', '.join(TFDS_NAMES)}.", name)
    source = open_tfds(name, split, root)
    prepared = tfds_files(source)
    if not prepared:  # nothing on disk to fingerprint (e.g. tfds.testing.mock_data): no cache
        return _dataset(read_tfds(source), name, split)
    key = cache.cache_key(source="tfds", path=prepared[0].parent, name=name, split=split,
                          files=cache.file_listing(prepared, prepared[0].parent))
    return _dataset(_cached(cache_dir, key, lambda: read_tfds(source)), name, split)
