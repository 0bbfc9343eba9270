"""Helpers shared by the gujax models: the single-example convention and parameter counts.

Every gujax model accepts either one example (no batch axis) or a batch, and
returns outputs with the same convention: a single example in gives a single
output out. Per-example losses (``gujax.per_example_grads``) can therefore call
``model.apply(variables, example)`` directly. No model mixes examples (no
BatchNorm), so batching never changes any example's output.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def add_batch_axis(x: jax.Array, example_ndim: int, *, model: str) -> tuple[jax.Array, bool]:
    """Returns ``(batched_x, was_single)``.

    ``x`` of rank ``example_ndim`` is one example and gets a leading axis of
    size 1; rank ``example_ndim + 1`` is already a batch. Any other rank is a
    ValueError, raised at trace time (shapes are static).
    """
    if x.ndim == example_ndim:
        return x[None], True
    if x.ndim == example_ndim + 1:
        return x, False
    raise ValueError(
        f"{model} expects one example of rank {example_ndim} or a batch of rank "
        f"{example_ndim + 1}; got shape {tuple(x.shape)}")


def check_floating(x: jax.Array, *, model: str) -> None:
    """Image models take float inputs (``gujax.data.to_float``), not raw uint8."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{model} expects floating-point inputs; got dtype {x.dtype} "
            "(convert uint8 images with gujax.data.to_float)")


def param_count(params: Any) -> int:
    """Total number of scalar parameters over every leaf of a pytree."""
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64)
                   for leaf in jax.tree_util.tree_leaves(params)))
