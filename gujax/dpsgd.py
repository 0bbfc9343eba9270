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

``dpsgd_monitor`` is the same aggregation plus a GNQ disclosure ledger
(``gujax.transforms.GnqState``) over the *clipped* per-example gradients with
the absolute floor lam = sigma^2 C^2: the injected noise N(0, sigma^2 C^2 I)
is exactly such an isotropic floor (DESIGN section 1), so DP-SGD runs are
audited on the same footing as plain SGD and the GNQ defenses.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gujax.grads import batch_size, finite_rows, gram as gram_matrix
from gujax.transforms import GnqState, check_example_ids, monitor_policy


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
        zeroed = _zero_dropped_rows(updates, mask, b)
        # The inner transformation divides the noisy sum by B (padded size).
        noisy_mean, state = inner.update(zeroed, state, params)
        scale = b / expected_batch_size
        return jax.tree_util.tree_map(lambda u: u * scale, noisy_mean), state

    return optax.GradientTransformationExtraArgs(inner.init, update)


class DpsgdMonitorState(NamedTuple):
    """State of ``dpsgd_monitor``.

    ledger: the GNQ disclosure ledger (``GnqState``), per training example.
    key: the noise PRNG key (split at every step).
    noise_multiplier: () float32, sigma. Kept in the state rather than in the
      compiled step, so runs that differ only in sigma (shadow models with
      slightly different training-set sizes) share one compiled step.
    """
    ledger: GnqState
    key: jax.Array
    noise_multiplier: jax.Array

    def step_metrics(self) -> dict[str, jax.Array]:
        """The ledger's per-step scalars (see ``GnqState.step_metrics``)."""
        return self.ledger.step_metrics()


def _zero_dropped_rows(updates, mask, b: int):
    """The per-example gradients with padding (mask False) and non-finite rows
    set to 0, so they add nothing to any sum, norm or Gram entry."""
    keep = finite_rows(updates)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (b,) or mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be a ({b},) bool array, got "
                             f"{mask.dtype} {mask.shape}")
        keep = keep & mask
    return jax.tree_util.tree_map(
        lambda g: jnp.where(keep.reshape((b,) + (1,) * (g.ndim - 1)), g, 0), updates)


def clip_factors_from_norms(norms: jax.Array, l2_norm_clip: float) -> jax.Array:
    """min(1, C / norm) per row; a zero norm gets factor 1."""
    return jnp.where(norms > l2_norm_clip, l2_norm_clip / jnp.where(norms > 0, norms, 1), 1.0)


def clip_factors(per_example, l2_norm_clip: float) -> jax.Array:
    """min(1, C / ||g_j||) per row (B,), ||.|| the L2 norm over all leaves;
    a zero gradient gets factor 1."""
    b = batch_size(per_example, name="per-example gradients")
    sq = sum(jnp.sum(jnp.square(jnp.reshape(g, (b, -1))), axis=1)
             for g in jax.tree_util.tree_leaves(per_example))
    return clip_factors_from_norms(jnp.sqrt(sq), l2_norm_clip)


def charge_ledger(gram: jax.Array, clip: jax.Array, finite: jax.Array, example_ids, mask,
                  state: "DpsgdMonitorState", *, l2_norm_clip: float) -> GnqState:
    """``dpsgd_monitor``'s ledger update, shared with the ghost stage.

    gram: (B, B) Gram matrix of the per-example gradients with dropped rows
      zeroed; clip: (B,) clip factors; finite: (B,) bool, rows whose gradient
      is finite. Charges GNQ of the clipped gradients with lam = sigma^2 C^2,
      as GNQ of K / (sigma C)^2 with lam = 1.
    """
    b = gram.shape[0]
    floor = jnp.square(state.noise_multiplier * l2_norm_clip).astype(gram.dtype)
    scaled = gram * (clip[:, None] * clip[None, :]).astype(gram.dtype) / floor
    # A non-finite row gets a NaN diagonal: the policy leaves it out of
    # every S_-j, as it is left out of the sum.
    scaled = scaled.at[jnp.arange(b), jnp.arange(b)].set(
        jnp.where(finite, jnp.diagonal(scaled), jnp.nan))
    policy = monitor_policy(num_examples=state.ledger.disclosure.shape[0], reg=1.0,
                            relative=False)
    _, ledger = policy.weights(scaled, example_ids, mask, state.ledger)
    return ledger


def add_noise(clipped_sum, ledger: GnqState, state: "DpsgdMonitorState", *,
              l2_norm_clip: float, expected_batch_size: float):
    """(clipped_sum + N(0, sigma^2 C^2 I)) / expected_batch_size and the new
    ``DpsgdMonitorState``. Key schedule: key, noise_key = split(state.key);
    one key per leaf from split(noise_key, num_leaves), in tree order."""
    key, noise_key = jax.random.split(state.key)
    leaves, treedef = jax.tree_util.tree_flatten(clipped_sum)
    noise_keys = jax.random.split(noise_key, len(leaves))
    std = state.noise_multiplier * l2_norm_clip
    out = [(g + std.astype(g.dtype) * jax.random.normal(nk, g.shape, g.dtype))
           / expected_batch_size for g, nk in zip(leaves, noise_keys)]
    return (jax.tree_util.tree_unflatten(treedef, out),
            DpsgdMonitorState(ledger, key, state.noise_multiplier))


def dpsgd_monitor(*, l2_norm_clip: float, noise_multiplier: float,
                  expected_batch_size: float, seed: int, num_examples: int,
                  dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """DP-SGD aggregation with a per-example GNQ disclosure ledger.

    The update is DP-SGD's: (sum_j clip(g_j) + N(0, sigma^2 C^2 I)) /
    expected_batch_size, over the real, finite rows (as ``dpsgd_aggregate``;
    the noise stream differs from it). The ledger is ``gnq_monitor``'s,
    charged on the clipped gradients with the absolute floor lam = sigma^2 C^2:

        GNQ_j = clip(g_j)^T (sum_{k != j} clip(g_k) clip(g_k)^T + sigma^2 C^2 I)^-1 clip(g_j)

    computed as the GNQ of K / (sigma C)^2 with lam = 1 (GNQ is invariant to
    scaling K and lam together). Since ||clip(g_j)|| <= C, one step discloses
    at most 1/2 log(1 + 1/sigma^2) nats about any example.

    Args: as ``dpsgd_aggregate`` (noise_multiplier must be > 0: it is the
      ledger's floor), plus
      num_examples: size of the ledger (example ids lie in [0, num_examples)).
      dtype: dtype of the Gram matrix and solve (``jnp.float64`` with x64).

    update(per_example_grads, state, params=None, *, example_ids, mask=None):
      per_example_grads: leaves (B, *param.shape); example_ids (B,) int;
      mask (B,) bool, False for padding rows. Returns (update, new state).
    """
    for name, value in (("l2_norm_clip", l2_norm_clip), ("noise_multiplier", noise_multiplier),
                        ("expected_batch_size", expected_batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (dpsgd_monitor's ledger "
                             f"needs a noise floor), got {value!r}")
    def init(params):
        del params
        return DpsgdMonitorState(monitor_policy(num_examples=num_examples, reg=1.0,
                                                relative=False).init(), jax.random.key(seed),
                                 jnp.asarray(noise_multiplier, jnp.float32))

    def update(updates, state, params=None, *, example_ids=None, mask=None, **extra):
        del params, extra
        b = batch_size(updates, name="per-example gradients")
        check_example_ids(example_ids, b, state.ledger.disclosure.shape[0])
        zeroed = _zero_dropped_rows(updates, mask, b)
        c = clip_factors(zeroed, l2_norm_clip)
        ledger = charge_ledger(gram_matrix(zeroed, dtype=dtype), c, finite_rows(updates),
                               example_ids, mask, state, l2_norm_clip=l2_norm_clip)
        clipped_sum = jax.tree_util.tree_map(
            lambda g: jnp.tensordot(c.astype(g.dtype), g, axes=1), zeroed)
        return add_noise(clipped_sum, ledger, state, l2_norm_clip=l2_norm_clip,
                         expected_batch_size=expected_batch_size)

    return optax.GradientTransformationExtraArgs(init, update)
