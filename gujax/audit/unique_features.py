"""Unique-feature memorisation (Hartley & Tsaftaris, 2022).

A *unique feature* (a small distinctive patch, or stamped text such as a
name) is inserted into exactly one training image. After training, the
model's sensitivity to the feature is read off out-of-distribution (OOD)
images X_ood: for each x in X_ood,

    KL_i = KL( p(y | x_i with feature) || p(y | x_i) )      (nats)

and the target model's mean KL is compared with that of reference models
trained without the feature (same recipe, other seeds). A model that
memorised the feature moves its prediction when the feature appears, even on
images from another distribution, so its mean KL sits above the references'.

The direction of the KL: the expectation is taken under the *featured*
output, so classes that the feature pushes probability towards (the
memorised label) are weighted by their new mass and penalised by how little
mass the clean image gave them. This is the divergence that grows most when a
memorised feature drags an OOD image towards one label.

Images are numpy arrays (H, W, C) or batches (..., H, W, C), uint8 or float;
the insertion functions return a new array of the same shape and dtype.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

PyTree = Any


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim < 3:
        raise ValueError(f"image must have shape (..., H, W, C), got {image.shape}")
    if 0 in image.shape:
        raise ValueError(f"image is empty, shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must be an integer or float array, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or Inf")
    return image


def _cast_values(values, dtype, what: str) -> np.ndarray:
    """``values`` as ``dtype``, refusing what the cast would silently change."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or Inf")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if np.any(values < info.min) or np.any(values > info.max) or np.any(values != np.round(values)):
            raise ValueError(
                f"{what} must hold integers in [{info.min}, {info.max}] for a {np.dtype(dtype)} "
                "image")
    return values.astype(dtype)


def _check_position(position, size, image_hw, what: str) -> tuple[int, int]:
    if len(position) != 2 or any(int(p) != p for p in position):
        raise ValueError(f"position must be two integers (row, col), got {position!r}")
    row, col = (int(p) for p in position)
    (h, w), (height, width) = size, image_hw
    if row < 0 or col < 0 or row + h > height or col + w > width:
        raise ValueError(
            f"{what} of size {h}x{w} at (row, col)=({row}, {col}) does not fit in a "
            f"{height}x{width} image")
    return row, col


def insert_patch(image, patch, position) -> np.ndarray:
    """Copy of ``image`` with ``patch`` pasted at ``position``.

    Args:
      image: (..., H, W, C) uint8 or float array (leading axes: a batch, all
        of which receive the patch).
      patch: (h, w, C) or (h, w) (the same value in every channel), values in
        the image's range and representable in its dtype.
      position: (row, col) of the patch's top-left pixel; the patch must fit.

    Returns:
      New array, shape and dtype of ``image``.
    """
    image = _check_image(image)
    patch = _cast_values(patch, image.dtype, "patch")
    if patch.ndim == 2:
        patch = patch[..., None]
    if patch.ndim != 3 or patch.shape[-1] not in (1, image.shape[-1]) or 0 in patch.shape:
        raise ValueError(
            f"patch must have shape (h, w), (h, w, 1) or (h, w, {image.shape[-1]}), got "
            f"{patch.shape}")
    row, col = _check_position(position, patch.shape[:2], image.shape[-3:-1], "patch")
    out = image.copy()
    out[..., row:row + patch.shape[0], col:col + patch.shape[1], :] = patch
    return out


def text_mask(text: str, image_hw: tuple[int, int], position=(0, 0)) -> np.ndarray:
    """(H, W) bool mask of ``text`` drawn in Pillow's built-in bitmap font.

    The bitmap font (``ImageFont.load_default_imagefont``) has no
    anti-aliasing and no dependence on installed FreeType fonts, so the mask is
    identical on every machine. Raises ValueError if the text is empty, has
    characters the font cannot draw, or does not fit at ``position``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    height, width = (int(s) for s in image_hw)
    font = ImageFont.load_default_imagefont()
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if len(position) != 2 or any(int(p) != p for p in position):
        raise ValueError(f"position must be two integers (row, col), got {position!r}")
    row, col = (int(p) for p in position)
    try:
        left, top, right, bottom = draw.textbbox((col, row), text, font=font)
    except UnicodeEncodeError as err:
        raise ValueError(f"the bitmap font cannot draw {text!r}: {err}") from None
    if left < 0 or top < 0 or right > width or bottom > height:
        raise ValueError(
            f"text {text!r} at (row, col)=({row}, {col}) spans columns [{left}, {right}) and "
            f"rows [{top}, {bottom}); it does not fit in a {height}x{width} image")
    draw.text((col, row), text, fill=255, font=font)
    return np.asarray(canvas) > 0


def stamp_text(image, text: str, *, position=(0, 0), value=None) -> np.ndarray:
    """Copy of ``image`` with ``text`` stamped on it (bitmap font, deterministic).

    Args:
      image: (..., H, W, C) uint8 or float array; every image of a batch gets
        the same stamp.
      text: the feature, e.g. a name. Printable ASCII.
      position: (row, col) of the text's anchor (top-left of its box).
      value: the ink, a scalar or (C,) per channel. Default: the dtype's
        maximum for integer images (255 for uint8), 1.0 for float images
        (which are assumed to lie in [0, 1]).

    Returns:
      New array, shape and dtype of ``image``; pixels under the glyphs set to
      ``value``, every other pixel unchanged.
    """
    image = _check_image(image)
    if value is None:
        value = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
    value = _cast_values(value, image.dtype, "value")
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, image.shape[-1])):
        raise ValueError(f"value must be a scalar or ({image.shape[-1]},), got {value.shape}")
    mask = text_mask(text, image.shape[-3:-1], position)
    out = image.copy()
    out[..., mask, :] = value
    return out


def _log_probs(apply_fn, params, images) -> jax.Array:
    logits = apply_fn(params, images)
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(
            f"apply_fn must return logits of shape (N, num_classes) = ({images.shape[0]}, K), "
            f"got {logits.shape}")
    return jax.nn.log_softmax(logits, axis=-1)


def feature_kl(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    images,
    images_with_feature,
) -> jax.Array:
    """Per-image KL(p(y | x with feature) || p(y | x)), in nats.

    Args:
      apply_fn: ``apply_fn(params, images) -> logits (N, K)`` on a batch, e.g.
        ``lambda p, x: model.apply({"params": p}, x)`` for a Flax Linen model.
        Images are passed as given: convert uint8 to the model's input scale
        before calling.
      params: the model's parameters.
      images: (N, ...) the out-of-distribution images without the feature.
      images_with_feature: (N, ...) the same images with the feature
        inserted (``insert_patch`` / ``stamp_text``).

    Returns:
      (N,) KL divergences, >= 0 (exactly 0 where the two outputs agree).
    """
    images, images_with_feature = np.asarray(images), np.asarray(images_with_feature)
    if images.shape != images_with_feature.shape:
        raise ValueError(
            f"images {images.shape} and images_with_feature {images_with_feature.shape} must "
            "have the same shape")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch (N, ...), got shape {images.shape}")
    for name, arr in (("images", images), ("images_with_feature", images_with_feature)):
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or Inf")
    log_p = _log_probs(apply_fn, params, jnp.asarray(images))
    log_q = _log_probs(apply_fn, params, jnp.asarray(images_with_feature))
    # sum_y q (log q - log p), with q = p(y | x with feature); rounding can leave
    # an identical pair a hair below zero.
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    return jnp.maximum(kl, 0.0)


def memorisation_score(target_kl, reference_kls) -> dict:
    """How far the target model's feature sensitivity exceeds the references'.

    Each model is summarised by its mean KL over the OOD images (the
    sensitivity in Hartley & Tsaftaris). With T the target's mean and R_r the
    reference models' means (models trained without the feature):

      - ``z_score`` = (T - mean_r R_r) / std_r R_r  (sample std, ddof=1): how
        many reference standard deviations the target sits above the
        references. The headline score: it is scale-free and needs no
        distributional assumption to read as a ranking.
      - ``ratio`` = T / mean_r R_r: the paper-style relative sensitivity.
      - ``p_value`` = (1 + #{r: R_r >= T}) / (1 + num_reference): the
        one-sided permutation p-value of "the target is just another
        reference model" (never below 1 / (num_reference + 1)).

    Args:
      target_kl: (N,) ``feature_kl`` of the target model on the OOD images.
      reference_kls: (num_reference, N) the same for each reference model, on
        the same images with the same feature; num_reference >= 2.

    Returns:
      dict of floats (JSON-ready): target_mean_kl, reference_mean_kl,
      reference_std_kl, z_score, ratio, p_value, num_reference, num_images.
      ``z_score`` is +-inf when the references all have the same mean KL.
    """
    target = np.asarray(target_kl, np.float64)
    refs = np.asarray(reference_kls, np.float64)
    if target.ndim != 1 or target.shape[0] == 0:
        raise ValueError(f"target_kl must have shape (N,) with N >= 1, got {target.shape}")
    if refs.ndim != 2 or refs.shape[1] != target.shape[0]:
        raise ValueError(
            f"reference_kls must have shape (num_reference, {target.shape[0]}), got "
            f"{refs.shape}")
    if refs.shape[0] < 2:
        raise ValueError(f"need at least 2 reference models for a spread, got {refs.shape[0]}")
    if not (np.all(np.isfinite(target)) and np.all(np.isfinite(refs))):
        raise ValueError("target_kl and reference_kls must be finite")
    if np.any(target < 0) or np.any(refs < 0):
        raise ValueError("KL divergences must be >= 0")
    t = float(target.mean())
    ref_means = refs.mean(axis=1)
    mu, sd = float(ref_means.mean()), float(ref_means.std(ddof=1))
    diff = t - mu
    z = diff / sd if sd > 0 else (0.0 if diff == 0 else float(np.copysign(np.inf, diff)))
    return {
        "target_mean_kl": t,
        "reference_mean_kl": mu,
        "reference_std_kl": sd,
        "z_score": z,
        "ratio": t / mu if mu > 0 else float("inf") if t > 0 else float("nan"),
        "p_value": float((1 + np.sum(ref_means >= t)) / (1 + ref_means.shape[0])),
        "num_reference": int(refs.shape[0]),
        "num_images": int(target.shape[0]),
    }
