"""The in-memory dataset every gujax experiment consumes, and uint8 -> float conversion."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gujax import checks


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in memory.

    Attributes:
      images: (N, H, W, C) uint8 pixel values 0..255, or float32 features
        already in the model's units (``gujax.features.scattering_features``).
      labels: (N,) int32 in [0, len(class_names)).
      ids: (N,) int64 stable example ids: the example's position in the
        canonical order of the full split it was loaded from, so ids lie in
        [0, size of the full split) and the same example gets the same id on
        every load. Subsets keep the ids of the examples they hold. Ids are
        unique within one (name, split), not across splits.
      class_names: label names, ``class_names[label]``.
      name: dataset name as passed to ``gujax.data.load``.
      split: split name ("train", "test", ...).
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    class_names: tuple[str, ...]
    name: str
    split: str

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"images must be (N, H, W, C) uint8 (pixels) or float32 "
                             f"(features); got {self.images.shape} {self.images.dtype}")
        if self.labels.shape != (n,) or self.labels.dtype != np.int32:
            raise ValueError(f"labels must be ({n},) int32; got {self.labels.shape} "
                             f"{self.labels.dtype}")
        if self.ids.shape != (n,) or self.ids.dtype != np.int64:
            raise ValueError(f"ids must be ({n},) int64; got {self.ids.shape} {self.ids.dtype}")
        checks.labels(self.labels, len(self.class_names),
                      f"labels of {self.name!r} split {self.split!r}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, split={self.split!r}, images={self.images.shape}, "
                f"classes={len(self.class_names)})")


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    Args:
      images: (N, H, W, C) uint8.

    Returns:
      ``(mean, std)``, each (C,) float64: the mean and population standard
      deviation of ``images / 255`` over all N * H * W pixels of each channel.
      Compute them on the training split and pass them to ``to_float``.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.size == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array; got {images.shape}")
    channels = images.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    # Chunked float64 sums: exact enough and no (N, H, W, C) float64 copy.
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].reshape(-1, channels).astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
    count = images.size // channels
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))


def model_inputs(images: jax.Array) -> jax.Array:
    """What a model takes: uint8 pixels scaled to [0, 1] float32, float
    inputs (features) cast to float32 and otherwise left as they are. Works
    inside ``jax.jit``."""
    if images.dtype == np.uint8:
        return jnp.asarray(images, jnp.float32) / 255.0
    return jnp.asarray(images, jnp.float32)


def to_float(images: jax.Array, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> jax.Array:
    """uint8 images -> float32: ``(images / 255 - mean) / std`` per channel.

    Args:
      images: (..., C) uint8 (a batch (B, H, W, C) or one image (H, W, C)).
      mean, std: (C,) per-channel statistics in [0, 1] units (from
        ``channel_stats`` on the training split). Left out, the result is
        ``images / 255`` in [0, 1].

    Works on numpy or JAX arrays and inside ``jax.jit``.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8 images; got {images.dtype}")
    x = jnp.asarray(images, jnp.float32) / 255.0
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    if mean is not None:
        mean = jnp.asarray(mean, jnp.float32)
        std = jnp.asarray(std, jnp.float32)
        if mean.shape != (images.shape[-1],) or std.shape != mean.shape:
            raise ValueError(f"mean and std must be ({images.shape[-1]},); got "
                             f"{mean.shape} and {std.shape}")
        x = (x - mean) / std
    return x
