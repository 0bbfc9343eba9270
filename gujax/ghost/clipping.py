"""Ghost clipping: DP-SGD without materialising per-example gradients.

DP-SGD needs only each example's gradient norm ||g_j|| (the diagonal of K,
layer by layer, never the B x B cross terms) and then the clipped sum
sum_j min(1, C / ||g_j||) g_j, which the captured layer inputs and output
gradients give directly as one weighted weight-gradient contraction per layer
(``gujax.ghost.kernels.tape_weighted_grad``): a forward pass, one backward
pass for the output gradients, the norms, and the weight-gradient half of a
second backward pass.

Both functions are the trainer's ghost stage with ``gujax.policies.dpsgd_policy``
(``gujax.engine.ghost_engine`` and ``policy_step``, as ``make_stage`` runs
them), returning the clip decisions beside the update.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gujax.engine import ghost_engine
from gujax.ghost.capture import LossFn
from gujax.noise import Noise
from gujax.policies import DpsgdState, dpsgd_policy

PyTree = Any


class ClipInfo(NamedTuple):
    """norms: (B,) per-example gradient L2 norms (NaN/Inf for a non-finite
    gradient); weights: (B,) the clip factors actually applied (0 for masked
    or non-finite rows); losses: (B,) per-example losses."""
    norms: jax.Array
    weights: jax.Array
    losses: jax.Array


def _clipped_sum(loss_fn, params, batch, policy, state, mask):
    """(sum_j c_j g_j, state, ClipInfo): the policy's clip weights and their
    weighted sum, before its finish (the noise)."""
    grad_pass = ghost_engine(loss_fn).run(params, batch)
    stats = grad_pass.statistics(policy.cross_terms)
    weights, state = policy.weights(stats, None, mask, state)
    info = ClipInfo(jnp.sqrt(stats.sq_norms), weights, grad_pass.losses)
    return grad_pass.weighted_sum(weights, stats), state, info


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
    # No finish: it would draw P Gaussians (sigma is traced state, so sigma = 0
    # still draws) and add zeros, a cost larger than the step's on a small model.
    total, _, info = _clipped_sum(loss_fn, params, batch, policy, policy.init(), mask)
    return total, info


def ghost_dpsgd(loss_fn: LossFn, params: PyTree, batch: PyTree, state: DpsgdState, *,
                mask=None, noise: Noise = Noise()
                ) -> tuple[PyTree, DpsgdState, ClipInfo]:
    """One DP-SGD aggregation by ghost clipping.

    Returns (sum_j clip_C(g_j) + N(0, sigma^2 C^2 I)) / expected_batch_size
    (shaped like params), the state with the next key, and ``ClipInfo``.

    Args:
      state: a ``DpsgdState`` without a ledger, e.g.
        ``dpsgd_policy(l2_norm_clip=C, expected_batch_size=q N,
        noise_multiplier=sigma, seed=s, noise=noise).init()`` (or
        ``gujax.dpsgd_aggregate(...).init(params)``): sigma, C, the
        denominator and the key are read from it.
      mask: optional (B,) bool, False for padding rows.
      noise: the generator the state's key was made for (``gujax.noise.Noise``).
    """
    if not isinstance(state, DpsgdState) or state.ledger is not None:
        raise ValueError("ghost_dpsgd takes a DpsgdState without a ledger "
                         "(dpsgd_policy(...).init()), got " + type(state).__name__)
    # The constants in the closure are placeholders: every one is read from state.
    policy = dpsgd_policy(l2_norm_clip=1.0, expected_batch_size=1.0, noise_multiplier=0.0,
                          noise=noise)
    total, state, info = _clipped_sum(loss_fn, params, batch, policy, state, mask)
    update, state = policy.finish(total, state)
    return update, state, info
