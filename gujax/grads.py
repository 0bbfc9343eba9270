"""Per-example gradients and their Gram matrix.

Everything here works on pytrees whose leaves carry a leading batch axis of
size B: ``per_example_grads`` produces them, ``gram`` reduces them to the
B x B matrix of inner products that every GNQ computation starts from.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def batch_size(tree: PyTree, *, name: str = "batch") -> int:
    """The common leading-axis size of every leaf of ``tree``.

    Raises ValueError for a tree with no array leaves, a scalar leaf, leaves
    whose leading axes differ, or an empty batch (size 0). Shapes are static,
    so this runs at trace time and costs nothing under ``jax.jit``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        raise ValueError(f"{name} has no array leaves")
    sizes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} is a scalar; every leaf "
                "needs a leading batch axis")
        sizes.setdefault(shape[0], jax.tree_util.keystr(path))
    if len(sizes) > 1:
        detail = ", ".join(f"{p or '<root>'}: {n}" for n, p in sizes.items())
        raise ValueError(f"{name} leaves have different leading (batch) axes: {detail}")
    (size,) = sizes
    if size == 0:
        raise ValueError(f"{name} is empty (leading axis of size 0)")
    return size


def per_example_grads(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Gradient of each example's own loss at ``params``.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``, where ``example`` is one
        slice ``batch[i]`` of every leaf (no batch axis).
      params: any pytree of arrays (Flax Linen ``variables['params']``, or the
        ``nnx.State`` of a split NNX module; see the README).
      batch: a pytree of arrays sharing a leading axis of size B.
      chunk_size: if given, examples are processed ``chunk_size`` at a time
        (vmap inside a sequential ``lax.map``), bounding peak memory to about
        ``chunk_size`` per-example gradients plus the (B, ...) output. The
        result is identical to the unchunked one.

    Returns:
      A pytree with the structure of ``params`` whose leaves have shape
      ``(B, *param.shape)``: leaf ``[i]`` is d loss_fn(params, batch[i]) / d params.
    """
    return _per_example(jax.grad(loss_fn), params, batch, chunk_size)


def per_example_losses_and_grads(loss_fn, params: PyTree, batch: PyTree, *,
                                 chunk_size: int | None = None) -> tuple[jax.Array, PyTree]:
    """((B,) per-example losses, per-example gradients) from one forward and
    backward pass per example; as ``per_example_grads`` otherwise."""
    return _per_example(jax.value_and_grad(loss_fn), params, batch, chunk_size)


def _per_example(fn, params, batch, chunk_size):
    n = batch_size(batch)
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn, in_axes=(None, 0))(params, batch)
    return jax.lax.map(lambda ex: fn(params, ex), batch, batch_size=int(chunk_size))


def finite_rows(per_example: PyTree) -> jax.Array:
    """(B,) bool: True where every entry of example i's gradient is finite."""
    n = batch_size(per_example, name="per_example_grads")
    ok = jnp.ones((n,), bool)
    for leaf in jax.tree_util.tree_leaves(per_example):
        ok &= jnp.all(jnp.isfinite(jnp.reshape(leaf, (n, -1))), axis=1)
    return ok


def gram(per_example: PyTree, *, dtype: Any = None) -> jax.Array:
    """The B x B Gram matrix K_jk = <g_j, g_k> of per-example gradients.

    Summed leaf by leaf (each leaf reshaped to (B, p_leaf)), so no (B, P)
    matrix of the whole model is ever concatenated.

    Args:
      per_example: pytree whose leaves have a common leading axis B.
      dtype: accumulate in this dtype. ``jnp.float64`` (with
        ``jax.config.update("jax_enable_x64", True)``) computes K from float32
        gradients in double precision; that is the way to get float64 GNQ
        without running the model in float64. Default: the gradients' dtype,
        with the highest matmul precision; float32 for half-precision
        gradients (float16, bfloat16: about 3 significant digits, and float16
        overflows above 65504).

    Returns:
      (B, B) array, symmetric positive semi-definite.
    """
    n = batch_size(per_example, name="per_example_grads")
    if dtype is None:
        common = jnp.result_type(*jax.tree_util.tree_leaves(per_example))
        if jnp.issubdtype(common, jnp.floating) and jnp.finfo(common).bits < 32:
            dtype = jnp.float32
    k = None
    for leaf in jax.tree_util.tree_leaves(per_example):
        flat = jnp.reshape(leaf, (n, -1))
        if dtype is not None:
            flat = flat.astype(dtype)
        part = jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST)
        k = part if k is None else k + part.astype(k.dtype)
    return k
