"""DP-SGD as optax transformations over per-example gradients.

Both are adapters of ``gujax.policies.dpsgd_policy``, the one DP-SGD of gujax
(the trainer's explicit and ghost stages and ``gujax.ghost.ghost_dpsgd`` use
the same policy, through the same ``gujax.engine.policy_step``): per-example
L2 clipping to C, Gaussian noise N(0, sigma^2 C^2 I) on the sum, with

* padding rows (``mask`` False, from ``gujax.sampling.poisson_batch``) and
  rows whose gradient is not finite contributing exactly nothing;
* the noisy sum divided by the *expected* batch size q N (required), not by
  the padded or realised size, which would make the scale data-dependent;
* the noise drawn by a ``gujax.noise.Noise`` (by default optax's key
  schedule, so ``dpsgd_aggregate`` gives
  ``optax.contrib.differentially_private_aggregate``'s update for the same
  key, scaled by B / expected_batch_size).

Their state is a ``DpsgdState``: the key, sigma, C and the expected batch
size, and for ``dpsgd_monitor`` the ledger. They take the same keywords as
the GNQ transformations (``dpsgd_aggregate`` accepts ``example_ids`` and
ignores it), so the trainer can swap one for the other.

``dpsgd_monitor`` adds a GNQ disclosure ledger over the *clipped* gradients
with the absolute floor lam = sigma^2 C^2: the injected noise is exactly such
an isotropic floor (docs/theory.md, section 4), so DP-SGD runs are audited
on the same footing as plain SGD and the GNQ defenses.
"""
from __future__ import annotations

from typing import Any

import optax

from gujax.noise import Noise
from gujax.policies import dpsgd_policy
from gujax.transforms import policy_transformation

__all__ = ["dpsgd_aggregate", "dpsgd_monitor"]


def dpsgd_aggregate(*, l2_norm_clip: float, noise_multiplier: float,
                    expected_batch_size: float, seed: int, noise: Noise = Noise()
                    ) -> optax.GradientTransformationExtraArgs:
    """DP-SGD's private aggregation of per-example gradients.

    Args:
      l2_norm_clip: C, per-example L2 clip norm (gradient units).
      noise_multiplier: sigma >= 0, noise standard deviation in units of C.
      expected_batch_size: q N for Poisson sampling (q the sample rate, N the
        training-set size), or the fixed batch size.
      seed: seeds the noise; the key lives in the state (``DpsgdState``), so
        a restored state continues the same noise stream.
      noise: the generator (``gujax.noise.Noise``): another choice, another
        stream, the same distribution.

    update(per_example_grads, state, params=None, *, mask=None, **ignored):
      per_example_grads: leaves (B, *param.shape), B the padded batch size.
      mask: (B,) bool, False for padding rows.
      Returns (sum_j clip(g_j) + N(0, sigma^2 C^2 I)) / expected_batch_size.
    """
    return policy_transformation(dpsgd_policy(
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size, seed=seed, noise=noise))


def dpsgd_monitor(*, l2_norm_clip: float, noise_multiplier: float,
                  expected_batch_size: float, seed: int, num_examples: int,
                  dtype: Any = None, noise: Noise = Noise()
                  ) -> optax.GradientTransformationExtraArgs:
    """DP-SGD aggregation with a per-example GNQ disclosure ledger.

    The update is DP-SGD's, as ``dpsgd_aggregate`` (the same noise stream for
    the same seed). The ledger is ``gnq_monitor``'s, charged on the clipped
    gradients with the absolute floor lam = sigma^2 C^2:

        GNQ_j = clip(g_j)^T (sum_{k != j} clip(g_k) clip(g_k)^T + sigma^2 C^2 I)^-1 clip(g_j)

    Since ||clip(g_j)|| <= C, one step discloses at most 1/2 log(1 + 1/sigma^2)
    nats about any example.

    Args: as ``dpsgd_aggregate`` (noise_multiplier must be > 0: it is the
      ledger's floor), plus
      num_examples: size of the ledger (example ids lie in [0, num_examples)).
      dtype: dtype of the Gram matrix and solve (``jnp.float64`` with x64).

    update(per_example_grads, state, params=None, *, example_ids, mask=None):
      per_example_grads: leaves (B, *param.shape); example_ids (B,) int;
      mask (B,) bool, False for padding rows. Returns (update, new state).
    """
    return policy_transformation(dpsgd_policy(
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size, seed=seed, num_examples=num_examples,
        noise=noise), dtype=dtype)
