"""Batch image augmentations in JAX, keyed by a PRNG key, with per-example randomness.

All functions take a batch (B, H, W, C) of any dtype, return the same shape
and dtype, and work inside ``jax.jit`` (padding is static; offsets are traced).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_PAD_MODES = ("reflect", "constant")


def _check_batch(images: jax.Array) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be a batch (B, H, W, C); got shape {images.shape}")


def crop(images: jax.Array, shifts: jax.Array, padding: int, mode: str = "reflect") -> jax.Array:
    """Translates each image by its own shift, filling the border by padding.

    Args:
      images: (B, H, W, C).
      shifts: (B, 2) integers in [-padding, padding]: (dy, dx). Output pixel
        (i, j) of image b is input pixel (i + dy, j + dx) of the padded
        image, so shift (0, 0) is the identity. Values outside the range
        are clipped to it (they cannot be checked under jit).
      padding: pixels of padding on every side (static).
      mode: "reflect" (mirror without repeating the edge pixel, as
        ``jnp.pad(mode="reflect")``) or "constant" (zeros).

    Returns:
      (B, H, W, C), same dtype.
    """
    _check_batch(images)
    if mode not in _PAD_MODES:
        raise ValueError(f"mode must be one of {_PAD_MODES}; got {mode!r}")
    if padding < 0 or (mode == "reflect" and padding >= min(images.shape[1:3])):
        raise ValueError(f"padding must be in [0, min(H, W)) for reflect, >= 0 otherwise; "
                         f"got {padding}")
    if shifts.shape != (images.shape[0], 2):
        raise ValueError(f"shifts must be ({images.shape[0]}, 2); got {shifts.shape}")
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
    starts = jnp.clip(shifts + padding, 0, 2 * padding)

    def one(image, start):
        return jax.lax.dynamic_slice(image, (start[0], start[1], 0), (height, width, channels))

    return jax.vmap(one)(padded, starts)


def random_crop(key: jax.Array, images: jax.Array, padding: int = 4,
                mode: str = "reflect") -> jax.Array:
    """Pad by ``padding`` and crop back to (H, W) at a uniform random offset per example.

    Each example draws its shift (dy, dx) independently and uniformly from
    {-padding, ..., padding}^2 (the usual CIFAR "pad 4, random crop 32").
    ``mode`` as in ``crop``; "reflect" is the default because zero borders
    are a feature no test image has.
    """
    _check_batch(images)
    shifts = jax.random.randint(key, (images.shape[0], 2), -padding, padding + 1)
    return crop(images, shifts, padding, mode)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right (the W axis) with probability 1/2, independently."""
    _check_batch(images)
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4,
                     mode: str = "reflect") -> jax.Array:
    """``random_crop`` then ``random_flip`` with independent halves of ``key``."""
    crop_key, flip_key = jax.random.split(key)
    return random_flip(flip_key, random_crop(crop_key, images, padding, mode))
