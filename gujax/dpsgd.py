"""DP-SGD aggregation for padded, Poisson-sampled batches.

Wraps ``optax.contrib.differentially_private_aggregate`` (per-example L2
clipping to C, Gaussian noise N(0, sigma^2 C^2 I) on the sum) so that

* padding rows (``mask`` False, from ``gujax.sampling.poisson_batch``) and
  rows whose gradient is not finite contribute exactly nothing: they are
  zeroed before clipping, and a zero gradient clips to zero;
* the noisy sum is divided by the *expected* batch size q N, not by the padded
  or realised size, which would make the scale data-dependent.

It takes the same keywords as the GNQ transformations (``example_ids`` is
accepted and ignored), so the trainer can swap one for the other.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from gujax.grads import batch_size, finite_rows


def dpsgd_aggregate(*, l2_norm_clip: float, noise_multiplier: float,
                    expected_batch_size: float, seed: int
                    ) -> optax.GradientTransformationExtraArgs:
    """DP-SGD's private aggregation of per-example gradients.

    Args:
      l2_norm_clip: C, per-example L2 clip norm (gradient units).
      noise_multiplier: sigma, noise standard deviation in units of C.
      expected_batch_size: q N for Poisson sampling (q the sample rate, N the
        training-set size), or the fixed batch size.
      seed: seeds the noise; the key lives in the state, so a restored state
        continues the same noise stream.

    update(per_example_grads, state, params=None, *, mask=None, **ignored):
      per_example_grads: leaves (B, *param.shape), B the padded batch size.
      mask: (B,) bool, False for padding rows.
      Returns (sum_j clip(g_j) + N(0, sigma^2 C^2 I)) / expected_batch_size.
    """
    for name, value in (("l2_norm_clip", l2_norm_clip),
                        ("expected_batch_size", expected_batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real) \
            or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got "
                         f"{noise_multiplier!r}")
    inner = optax.contrib.differentially_private_aggregate(
        l2_norm_clip, noise_multiplier, key=jax.random.key(seed))

    def update(updates, state, params=None, *, mask=None, **extra):
        del extra
        b = batch_size(updates, name="per-example gradients")
        keep = finite_rows(updates)
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != (b,) or mask.dtype != jnp.bool_:
                raise ValueError(f"mask must be a ({b},) bool array, got "
                                 f"{mask.dtype} {mask.shape}")
            keep = keep & mask
        zeroed = jax.tree_util.tree_map(
            lambda g: jnp.where(keep.reshape((b,) + (1,) * (g.ndim - 1)), g, 0), updates)
        # The inner transformation divides the noisy sum by B (padded size).
        noisy_mean, state = inner.update(zeroed, state, params)
        scale = b / expected_batch_size
        return jax.tree_util.tree_map(lambda u: u * scale, noisy_mean), state

    return optax.GradientTransformationExtraArgs(inner.init, update)
