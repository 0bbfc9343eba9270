"""Ghost clipping: DP-SGD without materialising per-example gradients.

DP-SGD needs only each example's gradient norm ||g_j|| (the diagonal of K,
layer by layer, never the B x B cross terms) and then the clipped sum
sum_j min(1, C / ||g_j||) g_j, which the captured layer inputs and output
gradients give directly as one weighted weight-gradient contraction per layer
(``gujax.ghost.gram.tape_weighted_grad``): a forward pass, one backward pass
for the output gradients, the norms, and the weight-gradient half of a second
backward pass.

Semantics match ``gujax.dpsgd.dpsgd_aggregate`` (itself
``optax.contrib.differentially_private_aggregate`` with padding masks and
division by the expected batch size): rows masked out or whose gradient is not
finite contribute nothing; the noise is N(0, sigma^2 C^2) per coordinate drawn
with optax's key schedule (``new_key, *leaf_keys = split(key, n_leaves + 1)``,
one key per parameter leaf in ``jax.tree.leaves`` order), so the same key gives
the same update as the materialised path, to rounding.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.contrib import DifferentiallyPrivateAggregateState

from gujax.ghost.capture import LossFn, capture
from gujax.ghost.gram import tape_sq_norms, tape_weighted_grad
from gujax.grads import batch_size

PyTree = Any


class ClipInfo(NamedTuple):
    """norms: (B,) per-example gradient L2 norms (NaN/Inf for a non-finite
    gradient); weights: (B,) the clip factors actually applied (0 for masked
    or non-finite rows); losses: (B,) per-example losses."""
    norms: jax.Array
    weights: jax.Array
    losses: jax.Array


def _check_positive(value, name: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            value = float(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return  # a tracer: trusted
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_mask(mask, n: int):
    if mask is None:
        return jnp.ones((n,), bool)
    mask = jnp.asarray(mask)
    if mask.shape != (n,) or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a ({n},) bool array, got {mask.dtype} {mask.shape}")
    return mask


def clip_factors(sq_norms: jax.Array, l2_norm_clip, keep: jax.Array) -> jax.Array:
    """(B,) min(1, C / ||g_j||) where ``keep`` and the norm is finite, else 0."""
    norms = jnp.sqrt(sq_norms)
    factors = jnp.minimum(1.0, l2_norm_clip / norms)  # norm 0 -> inf -> 1
    return jnp.where(keep & jnp.isfinite(norms), factors, 0.0)


def ghost_clipped_sum(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                      l2_norm_clip, mask=None) -> tuple[PyTree, ClipInfo]:
    """sum_j min(1, C / ||g_j||) g_j over the kept rows, shaped like params.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``.
      params: parameter pytree.
      batch: pytree with leading axis B.
      l2_norm_clip: C > 0, in gradient-norm units.
      mask: optional (B,) bool, False for padding rows.
    """
    n = batch_size(batch)
    _check_positive(l2_norm_clip, "l2_norm_clip")
    keep = _check_mask(mask, n)
    tape = capture(loss_fn, params, batch)
    sq = tape_sq_norms(tape)
    weights = clip_factors(sq, l2_norm_clip, keep)
    total = tape_weighted_grad(tape, params, weights)
    return total, ClipInfo(jnp.sqrt(sq), weights, tape.losses)


def add_noise(clipped_sum: PyTree, state: DifferentiallyPrivateAggregateState, *,
              noise_std, denominator) -> tuple[PyTree, DifferentiallyPrivateAggregateState]:
    """(clipped_sum + N(0, noise_std^2 I)) / denominator, optax's key schedule."""
    leaves, treedef = jax.tree_util.tree_flatten(clipped_sum)
    new_key, *keys = jax.random.split(state.rng_key, len(leaves) + 1)
    noised = [(g + noise_std * jax.random.normal(k, g.shape, g.dtype)) / denominator
              for g, k in zip(leaves, keys)]
    return (jax.tree_util.tree_unflatten(treedef, noised),
            DifferentiallyPrivateAggregateState(rng_key=new_key))


def ghost_dpsgd(loss_fn: LossFn, params: PyTree, batch: PyTree,
                state: DifferentiallyPrivateAggregateState, *, l2_norm_clip,
                noise_multiplier, expected_batch_size=None, mask=None
                ) -> tuple[PyTree, DifferentiallyPrivateAggregateState, ClipInfo]:
    """One DP-SGD aggregation by ghost clipping.

    Returns (sum_j clip_C(g_j) + N(0, sigma^2 C^2 I)) / expected_batch_size
    (shaped like params), the state with the next key, and ``ClipInfo``.

    Args:
      state: ``DifferentiallyPrivateAggregateState(rng_key)``; the state of
        ``optax.contrib.differentially_private_aggregate`` or
        ``gujax.dpsgd.dpsgd_aggregate`` can be used unchanged.
      l2_norm_clip: C > 0. noise_multiplier: sigma >= 0.
      expected_batch_size: denominator (q N under Poisson sampling); default
        B, the padded batch size, as optax does.
      mask: optional (B,) bool, False for padding rows.
    """
    n = batch_size(batch)
    _check_positive(noise_multiplier, "noise_multiplier", allow_zero=True)
    if expected_batch_size is None:
        expected_batch_size = n
    _check_positive(expected_batch_size, "expected_batch_size")
    total, info = ghost_clipped_sum(loss_fn, params, batch,
                                    l2_norm_clip=l2_norm_clip, mask=mask)
    update, state = add_noise(total, state, noise_std=l2_norm_clip * noise_multiplier,
                              denominator=expected_batch_size)
    return update, state, info
