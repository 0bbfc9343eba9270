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

``AttackEvaluation`` gathers these metrics for an attack on M target models
(``gujax.audit.attacks.evaluate_attack`` builds it); ``tpr_at(fpr)`` reads
its TPR at an FPR level by value.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gujax import checks


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
    is_member = checks.boolean_array(is_member, "is_member")
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


class AttackEvaluation(NamedTuple):
    """Metrics of an attack over M targets (see ``attacks.evaluate_attack``).

    auc, balanced_accuracy: pooled over all (target, example) pairs.
    fpr_levels: (L,) the FPR targets; tpr_at_fpr: (L,) pooled TPR at each
      (``tpr_at(fpr)`` looks one up by its level).
    fpr, tpr: (K,) the pooled ROC curve.
    per_target_auc, per_target_balanced_accuracy: (M,); NaN for a target
      without both members and non-members among its scored examples.
    per_target_tpr_at_fpr: (M, L) (``per_target_tpr_at(fpr)``: one column).
    num_excluded: number of (target, example) pairs left out because their
      score was NaN.
    """
    auc: float
    balanced_accuracy: float
    fpr_levels: np.ndarray
    tpr_at_fpr: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    per_target_auc: np.ndarray
    per_target_balanced_accuracy: np.ndarray
    per_target_tpr_at_fpr: np.ndarray
    num_excluded: int

    def _level(self, fpr: float) -> int:
        """Position of the FPR level ``fpr`` in ``fpr_levels`` (to rounding)."""
        levels = np.asarray(self.fpr_levels, np.float64).reshape(-1)
        found = np.flatnonzero(np.isclose(levels, fpr, rtol=1e-9, atol=0.0))
        if found.size == 0:
            raise ValueError(
                f"TPR at FPR {fpr!r} was not computed; the levels are "
                f"{[float(x) for x in levels]} (evaluate_attack(..., fpr_levels=...))")
        return int(found[0])

    def tpr_at(self, fpr: float) -> float:
        """Pooled TPR at the FPR level ``fpr`` (one of ``fpr_levels``).

        Raises ValueError naming the computed levels if ``fpr`` is not one.
        """
        return float(np.asarray(self.tpr_at_fpr).reshape(-1)[self._level(fpr)])

    def per_target_tpr_at(self, fpr: float) -> np.ndarray:
        """(M,) per-target TPR at the FPR level ``fpr`` (as ``tpr_at``)."""
        return np.asarray(self.per_target_tpr_at_fpr)[:, self._level(fpr)]

    def summary(self) -> dict:
        """JSON-ready summary (no ROC curve): pooled and per-target metrics."""
        levels = [float(x) for x in self.fpr_levels]
        return {
            "auc": self.auc,
            "balanced_accuracy": self.balanced_accuracy,
            "tpr_at_fpr": {str(f): float(t) for f, t in zip(levels, self.tpr_at_fpr)},
            "per_target": {
                "auc": _json_list(self.per_target_auc),
                "balanced_accuracy": _json_list(self.per_target_balanced_accuracy),
                "tpr_at_fpr": {
                    str(f): _json_list(self.per_target_tpr_at_fpr[:, i])
                    for i, f in enumerate(levels)},
            },
            "num_excluded": self.num_excluded,
        }


def _json_list(values) -> list:
    return [None if np.isnan(v) else float(v) for v in np.asarray(values)]
