"""Batch samplers that match the privacy accounting in ``gujax.privacy``.

Every sampler is a pure function of (seed, step): a resumed run draws the
same batches without any sampler state to checkpoint. Batches are
``(ids, mask)``: ids (P,) int indices into the training set, mask (P,) bool,
False for padding rows (whose id is 0 and must be ignored).

* ``poisson_batch``: each example independently with probability q (the
  sampling that ``PoissonSampledDpEvent`` accounts for), padded to a fixed
  size P so that the jitted step keeps one shape.
* ``fixed_batch``: B distinct examples uniformly without replacement
  (``SampledWithoutReplacementDpEvent``).
* ``shuffled_batch``: epoch-wise permutation, no privacy amplification claim.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from gujax import checks


def poisson_padded_size(num_examples: int, sample_rate: float, *,
                        overflow_prob: float = 1e-9) -> int:
    """Smallest P with P(Binomial(N, q) > P) <= ``overflow_prob`` per step.

    With the default 1e-9, a run of 10^5 steps overflows with probability
    below 1e-4; ``poisson_batch`` never truncates an overflow anyway.
    """
    checks.positive_int(num_examples, "num_examples")
    checks.rate(sample_rate)
    if not 0 < overflow_prob < 1:
        raise ValueError(f"overflow_prob must be in (0, 1), got {overflow_prob!r}")
    return max(1, int(stats.binom.isf(overflow_prob, num_examples, sample_rate)))


def poisson_batch(seed: int, step: int, num_examples: int, sample_rate: float,
                  padded_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Poisson-sampled batch for ``step``, padded to ``padded_size`` rows.

    Returns ids (P,) int32 and mask (P,) bool with the sampled examples first.
    If more than ``padded_size`` examples are drawn (probability set by
    ``poisson_padded_size``), the batch is *not* truncated, since dropping
    examples would invalidate the accounting: it is returned whole, with P
    equal to the number drawn, and a ``RuntimeWarning`` is issued (the jitted
    step then compiles once more for the new shape).
    """
    checks.positive_int(num_examples, "num_examples")
    checks.rate(sample_rate)
    checks.positive_int(padded_size, "padded_size")
    rng = np.random.default_rng([seed, step, 1])
    ids = np.flatnonzero(rng.random(num_examples) < sample_rate).astype(np.int32)
    if len(ids) > padded_size:
        warnings.warn(f"Poisson batch at step {step} drew {len(ids)} > padded_size "
                      f"{padded_size} examples; returning it unpadded (not truncated)",
                      RuntimeWarning, stacklevel=2)
        return ids, np.ones(len(ids), bool)
    mask = np.zeros(padded_size, bool)
    mask[:len(ids)] = True
    padded = np.zeros(padded_size, np.int32)
    padded[:len(ids)] = ids
    return padded, mask


def fixed_batch(seed: int, step: int, num_examples: int, batch_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` distinct examples drawn uniformly without replacement,
    independently at every step. Returns ids (B,) int32 and an all-True mask."""
    checks.positive_int(num_examples, "num_examples")
    checks.positive_int(batch_size, "batch_size")
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds num_examples {num_examples}")
    rng = np.random.default_rng([seed, step, 2])
    ids = rng.choice(num_examples, size=batch_size, replace=False).astype(np.int32)
    return ids, np.ones(batch_size, bool)


def shuffled_batch(seed: int, step: int, num_examples: int, batch_size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``step`` of epoch-wise shuffling: epoch e = step // (N // B) uses
    one permutation of the training set; the last N mod B examples of each
    permutation are dropped. Returns ids (B,) int32 and an all-True mask."""
    checks.positive_int(num_examples, "num_examples")
    checks.positive_int(batch_size, "batch_size")
    per_epoch = num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds num_examples {num_examples}")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch, 3]).permutation(num_examples)
    ids = order[index * batch_size:(index + 1) * batch_size].astype(np.int32)
    return ids, np.ones(batch_size, bool)
