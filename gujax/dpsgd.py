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

``make_private`` ties the three parts of a DP-SGD run together (as Opacus's
``make_private_with_epsilon`` does): the batch sampler, this transformation
at the noise multiplier calibrated for the target epsilon, and the
accountant of that sampler. Its transformation refuses batches that the
accounted sampler cannot have drawn (no mask under Poisson accounting, or
the wrong number of rows), so a loop of one's own cannot report the
epsilon of another sampling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import numpy as np
import optax

from gujax import checks, privacy, sampling as samplers
from gujax.grads import batch_size as leading_size
from gujax.noise import Noise
from gujax.policies import dpsgd_policy
from gujax.transforms import policy_transformation

__all__ = ["PrivateTraining", "dpsgd_aggregate", "dpsgd_monitor", "make_private"]


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


# ----------------------------------------------------------------------------
# Sampler, transformation and accountant as one object.

@dataclasses.dataclass(frozen=True)
class PrivateTraining:
    """A DP-SGD run whose sampler, noise and accounting agree by construction
    (``make_private`` builds it).

    Fields:
      num_examples: N, the training-set size. batch_size: the expected batch
        size q N (Poisson) or the batch size B (fixed). epochs, steps
        (epochs * (N // batch_size)), sample_rate (q = batch_size / N).
      sampling: "poisson" or "fixed", the sampler of ``batch`` and what the
        accountant assumes. accountant: "rdp" or "pld". delta.
      target_epsilon: what was asked for; epsilon: what ``steps`` steps of
        this sampler at ``noise_multiplier`` spend (<= target_epsilon).
      noise_multiplier: sigma, calibrated. l2_norm_clip: C. seed: seeds the
        sampler and the noise.
      rows: the rows of each batch ``batch`` returns (Poisson: the padded
        size P, more only on an overflow; fixed: B).
      tx: the DP-SGD transformation (``dpsgd_aggregate``, or
        ``dpsgd_monitor`` with ``ledger=True``), which refuses a batch this
        sampler cannot have drawn: under Poisson accounting one without
        ``mask`` or with fewer than ``rows`` rows, under fixed-size
        accounting one with other than B rows or a padding row.
    """
    num_examples: int
    batch_size: int
    epochs: int
    steps: int
    sample_rate: float
    sampling: str
    accountant: str
    delta: float
    target_epsilon: float
    epsilon: float
    noise_multiplier: float
    l2_norm_clip: float
    seed: int
    rows: int
    tx: optax.GradientTransformationExtraArgs = dataclasses.field(repr=False)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (rows,) int32, mask (rows,) bool) of ``step``: a pure function
        of (seed, step) (``gujax.sampling``); padding rows have mask False."""
        if self.sampling == "poisson":
            return samplers.poisson_batch(self.seed, step, self.num_examples,
                                          self.sample_rate, self.rows)
        return samplers.fixed_batch(self.seed, step, self.num_examples, self.batch_size)

    def batches(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``batch(step)`` for step = start, ..., steps - 1: the whole run the
        epsilon accounts for (resume with ``start``)."""
        for step in range(start, self.steps):
            yield self.batch(step)

    def epsilon_after(self, steps: int) -> float:
        """epsilon spent after the first ``steps`` steps (at ``delta``)."""
        return privacy.dp_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta,
                                  sampling=self.sampling, accountant=self.accountant)

    def train_config(self, **overrides):
        """A ``gujax.train.TrainConfig`` that draws this run's batches (its
        epochs, batch size, sampling and seed); other fields by keyword."""
        from gujax.train import TrainConfig
        fixed = dict(epochs=self.epochs, batch_size=self.batch_size, sampling=self.sampling,
                     seed=self.seed)
        clash = sorted(set(fixed) & set(overrides))
        if clash:
            raise ValueError(f"{clash} are fixed by the accounting; build another "
                             "make_private(...) to change them")
        return TrainConfig(**fixed, **overrides)


def _matching_batches(inner: optax.GradientTransformationExtraArgs, sampling: str,
                      batch: int, rows: int) -> optax.GradientTransformationExtraArgs:
    """``inner``, refusing (ValueError, at trace time) batches that the
    accounted ``sampling`` cannot have produced."""
    def update(updates, state, params=None, *, mask=None, **extra):
        b = leading_size(updates, name="per-example gradients")
        if sampling == "poisson":
            if mask is None:
                raise ValueError(
                    "this DP-SGD transformation is accounted for Poisson sampling, and the "
                    "batch has no mask: pass the mask of the batch (PrivateTraining.batch / "
                    "gujax.sampling.poisson_batch). A fixed-size or shuffled batch is not "
                    "what the epsilon accounts for; use make_private(..., sampling='fixed') "
                    "for fixed-size batches")
            if b < rows:
                raise ValueError(
                    f"this DP-SGD transformation is accounted for Poisson sampling with "
                    f"batches padded to {rows} rows, got {b}: the batch was not drawn by its "
                    "sampler (PrivateTraining.batch)")
        else:
            if b != batch:
                raise ValueError(
                    f"this DP-SGD transformation is accounted for fixed-size batches of "
                    f"{batch}, got {b} rows: the batch was not drawn by its sampler "
                    "(PrivateTraining.batch)")
            if (mask is not None and not isinstance(mask, jax.core.Tracer)
                    and not np.all(np.asarray(mask))):
                raise ValueError("a fixed-size batch has no padding rows; this mask has "
                                 "some (a Poisson batch?)")
        return inner.update(updates, state, params, mask=mask, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def make_private(*, num_examples: int, batch_size: int, epochs: int, target_epsilon: float,
                 delta: float, l2_norm_clip: float, seed: int = 0, sampling: str = "poisson",
                 accountant: str = "rdp", ledger: bool = False, dtype: Any = None,
                 noise: Noise = Noise()) -> PrivateTraining:
    """Sampler, DP-SGD transformation and accountant, consistent by construction.

    Calibrates sigma (``gujax.privacy.calibrate_noise_multiplier``) so that
    ``epochs * (num_examples // batch_size)`` steps of ``sampling`` at
    q = batch_size / num_examples spend at most ``target_epsilon`` at
    ``delta``, and returns the ``PrivateTraining`` whose ``batch(step)`` draws
    exactly those batches and whose ``tx`` adds that noise (and refuses
    batches of another sampler).

    Args:
      num_examples: N, the training-set size (ids in [0, N)).
      batch_size: the expected batch size q N (Poisson) or B (fixed).
      epochs: passes over the data; one epoch is N // batch_size steps.
      target_epsilon, delta: the (epsilon, delta) to meet.
      l2_norm_clip: C, the per-example clip norm.
      seed: seeds the sampler and the noise.
      sampling: "poisson" (add-or-remove-one adjacency; RDP or PLD) or
        "fixed" (sampling without replacement, replace-one adjacency; RDP).
      accountant: "rdp" or "pld".
      ledger: use ``dpsgd_monitor`` (a GNQ ledger over the clipped gradients;
        ``tx.update`` then needs ``example_ids``) instead of ``dpsgd_aggregate``.
      dtype, noise: as ``dpsgd_monitor`` / ``dpsgd_aggregate``.
    """
    checks.positive_int(num_examples, "num_examples")
    checks.positive_int(batch_size, "batch_size")
    checks.positive_int(epochs, "epochs")
    if sampling not in ("poisson", "fixed"):
        raise ValueError(f"sampling must be 'poisson' or 'fixed' (the samplers with DP "
                         f"accounting), got {sampling!r}")
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds num_examples {num_examples}")
    rate = batch_size / num_examples
    steps = epochs * (num_examples // batch_size)
    sigma = privacy.calibrate_noise_multiplier(target_epsilon, rate, steps, delta,
                                               sampling=sampling, accountant=accountant)
    epsilon = privacy.dp_epsilon(sigma, rate, steps, delta, sampling=sampling,
                                 accountant=accountant)
    kwargs = dict(l2_norm_clip=l2_norm_clip, noise_multiplier=sigma,
                  expected_batch_size=batch_size, seed=seed, noise=noise)
    inner = (dpsgd_monitor(num_examples=num_examples, dtype=dtype, **kwargs) if ledger
             else dpsgd_aggregate(**kwargs))
    rows = (samplers.poisson_padded_size(num_examples, rate) if sampling == "poisson"
            else batch_size)
    return PrivateTraining(
        num_examples=num_examples, batch_size=batch_size, epochs=epochs, steps=steps,
        sample_rate=rate, sampling=sampling, accountant=accountant, delta=float(delta),
        target_epsilon=float(target_epsilon), epsilon=epsilon, noise_multiplier=sigma,
        l2_norm_clip=float(l2_norm_clip), seed=seed, rows=rows,
        tx=_matching_batches(inner, sampling, batch_size, rows))
