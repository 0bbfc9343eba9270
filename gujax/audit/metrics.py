"""Metrics of a membership-inference attack from its scores.

Every function takes ``scores`` (n,) -- higher means "more likely a member" --
and ``is_member`` (n,) bool, the ground truth. A threshold t predicts "member"
for every score >= t; since only the order of the scores matters, a threshold
can only split the examples between two *distinct* score values: tied scores
are always predicted together (no randomised tie-breaking). The ROC curve is
therefore the list of points obtained with t running over the distinct scores,
from (0, 0) (t = +inf, nobody predicted member) to (1, 1).

Counts are exact (integers) and rates are plain fractions of them, so
``tpr_at_fpr`` and ``balanced_accuracy`` never interpolate between ROC points.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class RocCurve(NamedTuple):
    """Empirical ROC curve, one point per distinct threshold.

    fpr: (K,) false-positive rate, non-decreasing, from 0 to 1.
    tpr: (K,) true-positive rate, non-decreasing, from 0 to 1.
    thresholds: (K,) the threshold of each point (predict member iff
      score >= threshold); thresholds[0] = +inf gives the point (0, 0).
    K = 1 + number of distinct scores.
    """
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _check_scores(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """Validate attack scores and labels; return them as flat numpy arrays.

    Raises ValueError for: different shapes, an empty input, labels that are
    not boolean (or 0/1), non-finite scores, or no members / no non-members
    (a rate would be 0/0).
    """
    scores = np.asarray(scores)
    is_member = np.asarray(is_member)
    if scores.shape != is_member.shape:
        raise ValueError(
            f"scores and is_member must have the same shape, got {scores.shape} "
            f"and {is_member.shape}")
    if scores.size == 0:
        raise ValueError("scores is empty")
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if is_member.dtype != bool:
        if not np.all((is_member == 0) | (is_member == 1)):
            raise ValueError("is_member must be boolean (or 0/1)")
        is_member = is_member.astype(bool)
    scores = scores.astype(np.float64).ravel()
    is_member = is_member.ravel()
    if not np.all(np.isfinite(scores)):
        bad = int(np.sum(~np.isfinite(scores)))
        raise ValueError(f"scores must be finite; {bad} are NaN or infinite")
    num_members = int(np.sum(is_member))
    if num_members == 0 or num_members == is_member.size:
        raise ValueError(
            f"need both members and non-members, got {num_members} members out "
            f"of {is_member.size}")
    return scores, is_member


def _roc_counts(scores, is_member):
    """Cumulative (false positives, true positives, thresholds) per distinct score."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_member = is_member[order]
    tp = np.cumsum(sorted_member)
    fp = np.cumsum(~sorted_member)
    # The last index of each run of equal scores: a threshold includes a whole run.
    run_end = np.flatnonzero(np.diff(sorted_scores) != 0)
    run_end = np.append(run_end, scores.size - 1)
    fp = np.concatenate([[0], fp[run_end]])
    tp = np.concatenate([[0], tp[run_end]])
    thresholds = np.concatenate([[np.inf], sorted_scores[run_end]])
    return fp, tp, thresholds


def roc(scores, is_member) -> RocCurve:
    """ROC curve of an attack.

    Args:
      scores: (n,) attack scores, higher = member. Finite.
      is_member: (n,) bool ground truth; needs both classes.

    Returns:
      RocCurve(fpr, tpr, thresholds), each (K,) with K = 1 + distinct scores
      (every point kept: scikit-learn's ``roc_curve(...,
      drop_intermediate=False)``).
    """
    scores, is_member = _check_scores(scores, is_member)
    fp, tp, thresholds = _roc_counts(scores, is_member)
    return RocCurve(fpr=fp / fp[-1], tpr=tp / tp[-1], thresholds=thresholds)


def auc(scores, is_member) -> float:
    """Area under the ROC curve (trapezoidal; ties count 1/2).

    Equals P(score of a random member > score of a random non-member)
    + 1/2 P(equal): 0.5 is chance, 1 a perfect attack.
    """
    curve = roc(scores, is_member)
    return float(np.trapezoid(curve.tpr, curve.fpr))


def tpr_at_fpr(scores, is_member, fpr) -> np.ndarray | float:
    """Largest true-positive rate reachable with a false-positive rate <= ``fpr``.

    Exact: the maximum over ROC points (thresholds between distinct scores)
    whose FPR does not exceed the target; no interpolation. With ``fpr = 0``
    this is the fraction of members scored strictly above every non-member.
    Note the resolution: with n0 non-members the FPR moves in steps of 1/n0,
    so a target below 1/n0 means FPR = 0.

    Args:
      scores, is_member: as in ``roc``.
      fpr: target false-positive rate(s) in [0, 1], scalar or array.

    Returns:
      TPR in [0, 1], a float for scalar ``fpr``, else an array of its shape.
    """
    targets = np.asarray(fpr, dtype=np.float64)
    if not np.all((targets >= 0) & (targets <= 1)):
        raise ValueError(f"fpr must lie in [0, 1], got {fpr!r}")
    curve = roc(scores, is_member)
    # fpr and tpr are both non-decreasing along the curve, so the best point
    # is the last one with fpr <= target (index >= 0: the first point is (0, 0)).
    last = np.searchsorted(curve.fpr, targets, side="right") - 1
    result = curve.tpr[last]
    return float(result) if np.ndim(result) == 0 else result


def balanced_accuracy(scores, is_member) -> float:
    """Best balanced accuracy over thresholds: max_t (TPR(t) + 1 - FPR(t)) / 2.

    This is the accuracy of the best single threshold on a population that
    is half members, half non-members (the "balanced accuracy" of Carlini et
    al. 2022, Table 1), whatever the actual class proportions. 0.5 is chance.
    """
    curve = roc(scores, is_member)
    return float(np.max(curve.tpr + 1 - curve.fpr) / 2)
