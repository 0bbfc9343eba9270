"""Bootstrap confidence intervals for the comparison's figures, and the
verdict of one arm against another read from them.

The data are *crossed*, not nested: each of M target models is scored on the
same N examples (the pool for the attacks and the training accuracy, the
test split for the test accuracy). An example that is easy to attack is easy
in every model, so the M scores of one example are correlated, as are the N
scores of one model. A bootstrap that resampled examples independently
within each model would treat those M scores as independent and give
intervals too narrow; the one here (Owen's "pigeonhole" bootstrap, Ann. Appl.
Stat. 1(2), 2007) resamples the M targets with replacement and,
independently, the N examples, and gives pair (m, j) the weight
(times target m was drawn) x (times example j was drawn). With M = 1 it is
the ordinary bootstrap over examples. Intervals are percentile intervals of
the statistic over the resamples.

    draws = crossed_resample(M, N, num_resamples=1000, seed=0)
    attack_intervals(scores, in_mask)          # pooled AUC and TPR at low FPR
    mean_interval(correct)                     # accuracy: mean over models
    compare(acc_a, attack_a, acc_b, attack_b)   # "better", "worse", ...

Why not ``jax_privacy.auditing``: its bootstrap (``BootstrapParams``)
resamples one set of IN and OUT scores, one level, one resample at a time;
and its AUROC and TPR at an FPR are those of the ROC's Pareto frontier (attacks
that randomise between thresholds), not the empirical ROC of
``gujax.audit.metrics`` that the tables report. For a single target its
resampler, driven with our AUC, is the reference ours is tested against
(tests/test_intervals.py).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from gujax import checks

# Resamples per vectorised chunk times pairs: bounds the (chunk, pairs)
# float64 work arrays of ``attack_intervals`` to about 32 MB each.
_CHUNK_ELEMENTS = 4_000_000


class Resample(NamedTuple):
    """Draw counts of a crossed bootstrap.

    targets: (B, M) int, how often each target was drawn in resample b
      (each row sums to M).
    examples: (B, N) int, how often each example was drawn (rows sum to N).
    """
    targets: np.ndarray
    examples: np.ndarray


def _counts(rng: np.random.Generator, size: int, num_resamples: int) -> np.ndarray:
    """(B, size) counts of ``size`` draws with replacement from range(size)."""
    draws = rng.integers(0, size, size=(num_resamples, size))
    offsets = np.arange(num_resamples)[:, None] * size
    return np.bincount((draws + offsets).ravel(),
                       minlength=num_resamples * size).reshape(num_resamples, size)


def crossed_resample(num_targets: int, num_examples: int, *, num_resamples: int = 1000,
                     seed: int = 0) -> Resample:
    """B resamples of M targets and, independently, N examples, each with
    replacement; deterministic in ``seed``. With one target its counts are
    all 1 (the targets are not resampled)."""
    num_targets = checks.positive_int(num_targets, "num_targets")
    num_examples = checks.positive_int(num_examples, "num_examples")
    num_resamples = checks.positive_int(num_resamples, "num_resamples", minimum=2)
    rng = np.random.default_rng(checks.seed(seed))
    targets = _counts(rng, num_targets, num_resamples)
    return Resample(targets, _counts(rng, num_examples, num_resamples))


def _percentile_interval(values: np.ndarray, confidence: float) -> np.ndarray:
    """(..., 2) [lo, hi] percentile interval over the first axis of ``values``."""
    tail = (1 - confidence) / 2
    return np.moveaxis(np.quantile(values, [tail, 1 - tail], axis=0), 0, -1)


# ----------------------------------------------------------------------------
# Means (accuracies).

def mean_interval(values, mask=None, *, num_resamples: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> np.ndarray:
    """Interval of the mean over M models of each model's mean over its
    examples (e.g. test accuracy from correctness (M, Z)).

    Args:
      values: (M, N) finite numbers, or (N,) for one model.
      mask: (M, N) bool, the examples each model's mean is over (e.g. the
        members for a training accuracy); None = all. Every model needs one.
      num_resamples, seed: the crossed bootstrap (``crossed_resample``).
      confidence: the interval's coverage, in (0, 1).

    Returns:
      (2,) float64 [lo, hi].

    Raises ValueError on an empty, non-finite or mis-shaped input, a model
    with an empty mask, or a resample in which a model draws none of its
    examples (inputs too small to bootstrap).
    """
    confidence = checks.probability(confidence, "confidence")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"values must be a non-empty (M, N) or (N,) array, got shape "
                         f"{values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"values must be finite; {int(np.sum(~np.isfinite(values)))} are "
                         f"NaN or infinite (leave such entries out with mask)")
    mask = np.ones(values.shape, bool) if mask is None else checks.boolean_array(mask, "mask")
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {values.shape}, got "
                         f"{mask.shape}")
    if not np.all(mask.any(axis=1)):
        raise ValueError(f"every model needs an example in mask; models "
                         f"{np.flatnonzero(~mask.any(axis=1)).tolist()} have none")
    draws = crossed_resample(*values.shape, num_resamples=num_resamples, seed=seed)
    counts = draws.examples.astype(np.float64)
    total = counts @ np.where(mask, values, 0.0).T          # (B, M)
    weight = counts @ mask.T.astype(np.float64)             # (B, M)
    if np.any(weight == 0):
        raise ValueError("a bootstrap resample holds none of a model's examples: too few "
                         "examples to bootstrap")
    means = (draws.targets * (total / weight)).sum(1) / values.shape[0]
    return _percentile_interval(means, confidence)


# ----------------------------------------------------------------------------
# Attacks.

class AttackIntervals(NamedTuple):
    """Intervals of an attack's pooled metrics (as ``evaluate_attack``).

    fpr_levels: (L,) the FPR targets.
    auc: (2,) [lo, hi] of the pooled ROC AUC.
    tpr_at_fpr: (L, 2) [lo, hi] of the pooled TPR at each FPR level
      (``tpr_at(fpr)`` reads one by value).
    confidence: the coverage; num_resamples: B.
    """
    fpr_levels: np.ndarray
    auc: np.ndarray
    tpr_at_fpr: np.ndarray
    confidence: float
    num_resamples: int

    def tpr_at(self, fpr: float) -> np.ndarray:
        """(2,) interval of the TPR at the FPR level ``fpr`` (one of ``fpr_levels``)."""
        found = np.flatnonzero(np.isclose(self.fpr_levels, fpr, rtol=1e-9, atol=0.0))
        if found.size == 0:
            raise ValueError(f"no interval at FPR {fpr!r}; the levels are "
                             f"{[float(x) for x in self.fpr_levels]}")
        return self.tpr_at_fpr[int(found[0])]


def _weighted_metrics(weights, member, run_end, levels):
    """Pooled AUC (b,) and TPR at ``levels`` (b, L) of b weighted copies of
    the pairs, which are sorted by decreasing score; ``run_end`` (K,) indexes
    the last pair of each run of tied scores. Weights are integer counts, so
    the rates are the same fractions ``metrics.roc`` forms from counts."""
    tp = np.cumsum(weights * member, axis=1)[:, run_end]
    fp = np.cumsum(weights * ~member, axis=1)[:, run_end]
    zeros = np.zeros((weights.shape[0], 1))
    tp = np.concatenate([zeros, tp], axis=1)
    fp = np.concatenate([zeros, fp], axis=1)
    if np.any(tp[:, -1] == 0) or np.any(fp[:, -1] == 0):
        raise ValueError("a bootstrap resample holds no members or no non-members: too "
                         "few (target, example) pairs to bootstrap")
    tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    auc = np.trapezoid(tpr, fpr, axis=1)
    # Both rates grow along the curve, so the best TPR with FPR <= f is the
    # largest TPR among those points (the first point, (0, 0), always is one).
    tpr_at = np.stack([np.max(np.where(fpr <= f, tpr, 0.0), axis=1) for f in levels], axis=1)
    return auc, tpr_at


def attack_intervals(scores, is_member, *, fpr_levels: Sequence[float] = (1e-3, 1e-2),
                     num_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> AttackIntervals:
    """Intervals of an attack's AUC and TPR at low FPR, pooled over targets
    as in ``gujax.audit.attacks.evaluate_attack`` (one threshold for all
    (target, example) pairs), by the crossed bootstrap over the M targets and
    the N examples.

    Args:
      scores: (M, N) attack scores, higher = member, or (N,) for one target;
        NaN marks an excluded pair (an undefined test), as in
        ``evaluate_attack``.
      is_member: bool, the shape of ``scores``.
      fpr_levels: the FPR targets in [0, 1].
      num_resamples, seed: the bootstrap (``crossed_resample``).
      confidence: the coverage, in (0, 1).

    Returns:
      ``AttackIntervals``.

    Raises ValueError for mismatched shapes, an empty input, infinite scores,
    no scored pair, FPR levels outside [0, 1], a missing class, or a resample
    without members or non-members (too few pairs).
    """
    confidence = checks.probability(confidence, "confidence")
    scores = np.asarray(scores, dtype=np.float64)
    is_member = checks.boolean_array(is_member, "is_member")
    if scores.ndim == 1:
        scores, is_member = scores[None], is_member.reshape(1, -1)
    if scores.ndim != 2 or scores.shape != is_member.shape or scores.size == 0:
        raise ValueError(f"scores and is_member must have the same non-empty (M, N) or (N,) "
                         f"shape, got {np.shape(scores)} and {np.shape(is_member)}")
    if np.any(np.isinf(scores)):
        raise ValueError("scores must not be infinite")
    levels = np.asarray(fpr_levels, dtype=np.float64).reshape(-1)
    if levels.size == 0 or not np.all((levels >= 0) & (levels <= 1)):
        raise ValueError(f"fpr_levels must be non-empty, each in [0, 1], got {fpr_levels!r}")
    valid = ~np.isnan(scores)
    members = int(np.sum(is_member[valid]))
    if members == 0 or members == int(valid.sum()):
        raise ValueError(f"need members and non-members among the scored pairs, got "
                         f"{members} members out of {int(valid.sum())} scored pairs")
    target, example = np.nonzero(valid)
    pair_scores = scores[valid]
    order = np.argsort(-pair_scores, kind="stable")
    target, example = target[order], example[order]
    member = is_member[valid][order]
    sorted_scores = pair_scores[order]
    run_end = np.append(np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1)

    draws = crossed_resample(*scores.shape, num_resamples=num_resamples, seed=seed)
    chunk = max(1, _CHUNK_ELEMENTS // sorted_scores.size)
    aucs, tprs = [], []
    for start in range(0, num_resamples, chunk):
        rows = slice(start, start + chunk)
        weights = (draws.targets[rows][:, target] * draws.examples[rows][:, example]
                   ).astype(np.float64)
        auc, tpr = _weighted_metrics(weights, member, run_end, levels)
        aucs.append(auc)
        tprs.append(tpr)
    return AttackIntervals(levels, _percentile_interval(np.concatenate(aucs), confidence),
                           _percentile_interval(np.concatenate(tprs), confidence),
                           confidence, num_resamples)


# ----------------------------------------------------------------------------
# Verdicts.

VERDICTS = ("better", "worse", "not distinguishable", "trade-off")


def _interval(value, name: str) -> tuple[float, float]:
    interval = np.asarray(value, dtype=np.float64)
    if interval.shape != (2,) or not np.all(np.isfinite(interval)) or interval[0] > interval[1]:
        raise ValueError(f"{name} must be a finite interval [lo, hi] with lo <= hi, "
                         f"got {value!r}")
    return float(interval[0]), float(interval[1])


def interval_order(a, b) -> int:
    """+1 if interval a = [lo, hi] lies wholly above b, -1 if wholly below,
    0 if they overlap (not distinguishable)."""
    a, b = _interval(a, "a"), _interval(b, "b")
    return 1 if a[0] > b[1] else -1 if a[1] < b[0] else 0


def compare(accuracy_a, attack_a, accuracy_b, attack_b) -> str:
    """Arm a against arm b from their intervals ([lo, hi] each): accuracy
    (higher is better) and an attack's success (TPR at an FPR, or AUC; lower
    is better).

    Returns one of ``VERDICTS``:
      "better": a is ahead on one axis and not distinguishable or ahead on
        the other (e.g. at equal attack success, more accurate);
      "worse": the same with a and b swapped;
      "not distinguishable": both pairs of intervals overlap;
      "trade-off": a is ahead on one axis and behind on the other (different
        points of the privacy/utility curve; neither dominates).
    """
    accuracy = interval_order(_interval(accuracy_a, "accuracy_a"),
                              _interval(accuracy_b, "accuracy_b"))
    privacy = -interval_order(_interval(attack_a, "attack_a"), _interval(attack_b, "attack_b"))
    if accuracy == privacy == 0:
        return "not distinguishable"
    if accuracy >= 0 and privacy >= 0:
        return "better"
    if accuracy <= 0 and privacy <= 0:
        return "worse"
    return "trade-off"
