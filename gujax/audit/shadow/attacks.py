"""Membership inference on a ``ShadowRecord``: each model in turn the
target, the others its shadows (LiRA online/offline, loss, RMIA), and
disclosure against LiRA vulnerability.

Under the canary protocol (a record with ``groups``: base rows always IN,
canary groups IN in exactly half of the models) only the canary rows are
attacked (the base rows have no OUT model, so nothing to test), and
``ShadowAudit.canary`` scores each canary group: the mean of its copies'
online LiRA scores (``group_scores``), with the canary-level AUC and TPR at
0.1% and 1% FPR and their 95% intervals (``gujax.audit.intervals``).

How LiRA combines the query augmentations (``gujax.audit.attacks.lira_online``):
one Gaussian per example, per augmentation and per IN/OUT group, fitted
leave-one-out to the other models' logit-scaled confidences; the
log-likelihood ratios of the augmentations are summed (a diagonal-covariance
multivariate Gaussian, Carlini et al.'s "independent" form), not a full
multivariate fit.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gujax import checks
from gujax.audit.attacks import (evaluate_attack, lira_offline, lira_online,
                                 logit_scaled_confidence, loss_scores, rmia)
from gujax.audit.intervals import AttackIntervals, attack_intervals
from gujax.audit.metrics import AttackEvaluation
from gujax.audit.shadow.record import ShadowRecord
from gujax.audit.vulnerability import (DisclosureVsVulnerability,
                                       disclosure_vs_vulnerability,
                                       per_example_vulnerability)


class CanaryAudit(NamedTuple):
    """The canary protocol's attack, per canary group (G groups, M targets).

      group_of_row (N,) int: the record's groups (-1 for base rows).
      group_size (G,) int: rows (copies) per group.
      scores (M, G): the mean online LiRA score (nats) of the group's rows.
      is_member (M, G) bool: target m trained on the group.
      evaluation: ``evaluate_attack(scores, is_member)`` (AUC, TPR at 0.1% and
        1% FPR) pooled over targets and groups.
      intervals: their 95% intervals (``attack_intervals``, crossed bootstrap
        over targets and groups); None when ``bootstrap_resamples`` is 0.
    """
    group_of_row: np.ndarray
    group_size: np.ndarray
    scores: np.ndarray
    is_member: np.ndarray
    evaluation: AttackEvaluation
    intervals: AttackIntervals | None


def group_scores(row_scores: np.ndarray, in_mask: np.ndarray, groups: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scores (M, G), is_member (M, G)): each canary group's score, the mean
    over its rows (copies) of ``row_scores`` (M, N), and its membership
    (``ValueError`` if a group's rows do not move together)."""
    groups = np.asarray(groups)
    num_groups = int(groups.max()) + 1
    canary = np.flatnonzero(groups >= 0)
    g = groups[canary]
    sizes = np.bincount(g, minlength=num_groups)
    total = np.zeros((row_scores.shape[0], num_groups))
    np.add.at(total.T, g, np.asarray(row_scores, np.float64)[:, canary].T)
    members = np.zeros((in_mask.shape[0], num_groups), np.int64)
    np.add.at(members.T, g, in_mask[:, canary].T.astype(np.int64))
    if np.any((members != 0) & (members != sizes)):
        raise ValueError("the rows of a canary group are not IN or OUT together")
    return total / sizes, members == sizes


def canary_evaluation(scores: np.ndarray, is_member: np.ndarray, *,
                      bootstrap_resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[AttackEvaluation,
                                                         AttackIntervals | None]:
    """``evaluate_attack`` on (M, G) group scores, and its intervals
    (``attack_intervals`` at 0.1% and 1% FPR; None for 0 resamples)."""
    evaluation = evaluate_attack(scores, is_member)
    intervals = (attack_intervals(scores, is_member, fpr_levels=(1e-3, 1e-2),
                                  num_resamples=bootstrap_resamples, confidence=confidence,
                                  seed=seed) if bootstrap_resamples else None)
    return evaluation, intervals


class ShadowAudit(NamedTuple):
    """Attacks on a ``ShadowRecord`` (each model the target, the rest shadows).

      evaluations: attack name -> ``AttackEvaluation`` for "lira_online",
        "lira_offline", "loss" and "rmia" (offline, a = 0.5, the population
        as reference).
      lira_scores (M, N): online LiRA scores (nats of log-likelihood ratio;
        NaN where an example lacks IN or OUT shadows).
      vulnerability (N,): mean online LiRA score of j over the models that
        trained on it (``per_example_vulnerability``).
      disclosure (N,): mean D_j (nats) over the models that trained on j
        (NaN if none did).
      disclosure_vs_vulnerability: Spearman rho and top-k precision of
        disclosure against vulnerability; None when fewer than 3 examples
        have both (a run that kept no disclosure ledger).
      canary: the canary protocol's per-group attack (``CanaryAudit``); None
        under the population protocol. Under the canary protocol
        ``evaluations`` and ``lira_scores`` cover the canary rows alone
        (NaN scores on the base rows), one row per copy.
    """
    evaluations: dict[str, AttackEvaluation]
    lira_scores: np.ndarray
    vulnerability: np.ndarray
    disclosure: np.ndarray
    disclosure_vs_vulnerability: DisclosureVsVulnerability | None
    canary: CanaryAudit | None = None


def _true_label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """p_y (M, n, A) from logits (M, n, A, C), in float64."""
    log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1),
                       np.float64)
    return np.exp(np.take_along_axis(log_p, labels[None, :, None, None], -1)[..., 0])


def mean_over_members(values: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """(N,) mean of values (M, N) over the models whose mask is True (NaN if none)."""
    counts = in_mask.sum(0)
    total = np.where(in_mask, values, 0.0).sum(0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def attack(record: ShadowRecord, *, augmentations=None, global_variance: bool | None = None,
           ks=(10, 50, 100), rmia_offline_a: float = 0.5, bootstrap_resamples: int = 1000,
           seed: int = 0) -> ShadowAudit:
    """Each model in turn as the target, the other M - 1 as its shadows.

    LiRA online and offline, the loss attack (log p_y averaged over the
    queries) and RMIA (offline, a = ``rmia_offline_a``, the population as
    reference).

    Args:
      record: a ``ShadowRecord``.
      augmentations: names of the recorded queries the attacks use (default
        all). On 8x8 digits a flipped digit is a noisy query and lowers LiRA's
        power; see docs/experiments.md.
      global_variance: LiRA's variance estimate; None = pooled when the
        shadows are few (M - 1 < 64), as Carlini et al. advise; under the
        canary protocol, pooled when M < 32 (fewer than 15 shadows per IN
        or OUT group), per-example Gaussians from M = 32 up (each canary has
        M/2 - 1 or M/2 shadows in each group, by design).
      ks: top-k precision of D_j against LiRA vulnerability (k > N dropped).
      bootstrap_resamples, seed: the canary protocol's 95% intervals
        (``CanaryAudit.intervals``; 0: none).

    The augmentations' log-likelihood ratios are summed (module docstring).
    """
    names = checks.subset(record.augmentations if augmentations is None else augmentations,
                          record.augmentations, "augmentations (of the recorded queries)")
    queries = [record.augmentations.index(a) for a in names]
    groups = record.groups
    # Canary protocol: only the canary rows (base rows have no OUT model).
    rows = slice(None) if groups is None else np.flatnonzero(np.asarray(groups) >= 0)
    logits = record.logits[:, rows][:, :, queries]
    population_logits = record.population_logits[:, :, queries]
    labels = record.pool_labels[rows]
    in_mask = record.in_mask[:, rows]
    if global_variance is None:
        global_variance = (in_mask.shape[0] - 1 < 64 if groups is None
                           else in_mask.shape[0] < 32)
    phi = np.asarray(logit_scaled_confidence(logits, labels[:, None]), np.float64)
    online = lira_online(phi, in_mask, global_variance=global_variance)
    evaluations = {
        "lira_online": evaluate_attack(*online),
        "lira_offline": evaluate_attack(*lira_offline(phi, in_mask,
                                                      global_variance=global_variance)),
        "loss": evaluate_attack(np.asarray(loss_scores(logits, labels[:, None]),
                                           np.float64).mean(-1), in_mask),
    }
    evaluations["rmia"] = evaluate_attack(*rmia(
        _true_label_probability(logits, labels), in_mask,
        _true_label_probability(population_logits, record.population_labels),
        offline_a=rmia_offline_a))
    lira_scores = np.asarray(online.scores, np.float64)
    vulnerability = per_example_vulnerability(*online)
    canary = None
    if groups is not None:
        n = record.in_mask.shape[1]
        full = np.full((in_mask.shape[0], n), np.nan)
        full[:, rows] = lira_scores
        lira_scores = full
        full_vulnerability = np.full(n, np.nan)
        full_vulnerability[rows] = vulnerability
        vulnerability = full_vulnerability
        scores, members = group_scores(lira_scores, record.in_mask, groups)
        evaluation, intervals = canary_evaluation(
            scores, members, bootstrap_resamples=bootstrap_resamples, seed=seed)
        canary = CanaryAudit(np.asarray(groups), np.bincount(groups[groups >= 0]), scores,
                             members, evaluation, intervals)
    disclosure = mean_over_members(record.disclosure.astype(np.float64), record.in_mask)
    # top-k is over the examples that have both a D_j and a LiRA score.
    both = int(np.sum(np.isfinite(disclosure) & np.isfinite(vulnerability)))
    ks = tuple(k for k in ks if k <= both) or (1,)
    # A run that kept no ledger (DP-SGD with ledger=False) has no D_j at all.
    relation = (disclosure_vs_vulnerability(disclosure, vulnerability, ks=ks)
                if both >= 3 else None)
    return ShadowAudit(evaluations, lira_scores, vulnerability, disclosure, relation, canary)
