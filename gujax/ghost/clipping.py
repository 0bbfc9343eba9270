"""Ghost clipping: DP-SGD without materialising per-example gradients.

DP-SGD needs only each example's gradient norm ||g_j|| (the diagonal of K,
layer by layer, never the B x B cross terms) and then the clipped sum
sum_j min(1, C / ||g_j||) g_j, which the captured layer inputs and output
gradients give directly as one weighted weight-gradient contraction per layer
(``gujax.ghost.kernels.tape_weighted_grad``): a forward pass, one backward
pass for the output gradients, the norms, and the weight-gradient half of a
second backward pass.

The decision is ``gujax.policies.dpsgd_policy``'s (the one used by every
DP-SGD path in gujax): rows masked out or whose gradient is not finite
contribute nothing, the noise is drawn with optax's key schedule
(``gujax.policies.gaussian_noise``), so the same key gives the same update as
``optax.contrib.differentially_private_aggregate`` on materialised gradients,
to rounding.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from optax.contrib import DifferentiallyPrivateAggregateState

from gujax import checks
from gujax.ghost.capture import LossFn, capture
from gujax.ghost.kernels import tape_sq_norms, tape_weighted_grad
from gujax.grads import batch_size
from gujax.policies import dpsgd_policy

PyTree = Any


class ClipInfo(NamedTuple):
    """norms: (B,) per-example gradient L2 norms (NaN/Inf for a non-finite
    gradient); weights: (B,) the clip factors actually applied (0 for masked
    or non-finite rows); losses: (B,) per-example losses."""
    norms: jax.Array
    weights: jax.Array
    losses: jax.Array


def _clip(loss_fn, params, batch, policy, state, mask):
    checks.mask(mask, batch_size(batch))
    tape = capture(loss_fn, params, batch)
    sq = tape_sq_norms(tape)
    weights, state = policy.weights(sq, None, mask, state)
    return tape_weighted_grad(tape, params, weights), state, ClipInfo(
        jnp.sqrt(sq), weights, tape.losses)


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
    policy = dpsgd_policy(l2_norm_clip=l2_norm_clip, expected_batch_size=1.0,
                          noise_multiplier=0.0)
    total, _, info = _clip(loss_fn, params, batch, policy, None, mask)
    return total, info


def ghost_dpsgd(loss_fn: LossFn, params: PyTree, batch: PyTree,
                state: DifferentiallyPrivateAggregateState, *, l2_norm_clip,
                noise_multiplier, expected_batch_size=None, mask=None,
                prng: str = "threefry2x32"
                ) -> tuple[PyTree, DifferentiallyPrivateAggregateState, ClipInfo]:
    """One DP-SGD aggregation by ghost clipping.

    Returns (sum_j clip_C(g_j) + N(0, sigma^2 C^2 I)) / expected_batch_size
    (shaped like params), the state with the next key, and ``ClipInfo``.

    Args:
      state: ``DifferentiallyPrivateAggregateState(rng_key)``; the state of
        ``optax.contrib.differentially_private_aggregate`` or
        ``gujax.dpsgd_aggregate`` can be used unchanged.
      l2_norm_clip: C > 0. noise_multiplier: sigma >= 0.
      expected_batch_size: denominator (q N under Poisson sampling); default
        B, the padded batch size, as optax does.
      mask: optional (B,) bool, False for padding rows.
      prng: the noise's key implementation and draw (``gujax.policies.NOISE_PRNGS``;
        the state's key must be of that implementation, as ``dpsgd_policy``'s init
        makes it).
    """
    n = batch_size(batch)
    policy = dpsgd_policy(l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
                          expected_batch_size=n if expected_batch_size is None
                          else expected_batch_size, prng=prng)
    total, _, info = _clip(loss_fn, params, batch, policy, state, mask)
    update, state = policy.finish(total, state)
    return update, state, info
