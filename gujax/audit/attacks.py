"""Membership-inference attacks on arrays: loss threshold, LiRA, RMIA.

The attacks take what shadow-model training produces, nothing else:

- ``phi`` (M, N, A): the logit-scaled confidence (``logit_scaled_confidence``)
  of each of M models on each of N pool examples under A augmented queries
  (A = 1 without augmentation);
- ``in_mask`` (M, N) bool: which examples each model was trained on.

Each model in turn is the target and the other M - 1 are its shadows
("leave one model out"): the score of example j against model m only uses
the other models' outputs on j. The attacks return ``MembershipScores``
(scores (M, N), is_member (M, N) = in_mask), and ``evaluate_attack`` turns
them into ROC AUC, balanced accuracy and TPR at low FPR, pooled over the
targets and per target.

All fits are vectorised over (targets, examples, augmentations): per-example
sums over all models, minus the target's own term. Everything is float64
numpy (the inputs are small: M x N x A numbers).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from gujax import checks
from gujax.audit import metrics
from gujax.audit.metrics import AttackEvaluation

# Variances are floored here so that a shadow set with identical outputs gives
# a huge but finite score rather than a division by zero.
_MIN_VARIANCE = 1e-30


class MembershipScores(NamedTuple):
    """Attack output.

    scores: (M, N) float64, higher = "member of model m's training set".
      NaN where the test is undefined (see each attack).
    is_member: (M, N) bool ground truth (the ``in_mask`` given).
    """
    scores: np.ndarray
    is_member: np.ndarray


# ----------------------------------------------------------------------------
# Per-example statistics from logits.


def _check_logits_labels(logits, labels):
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(
            f"logits must have shape (..., C) with C >= 2 classes, got {logits.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    try:
        labels = jnp.broadcast_to(labels, logits.shape[:-1])
    except ValueError:
        raise ValueError(
            f"labels of shape {labels.shape} do not broadcast to logits.shape[:-1] "
            f"= {logits.shape[:-1]}") from None
    num_classes = logits.shape[-1]
    if not isinstance(labels, jax.core.Tracer) and labels.size and (
            int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return logits, labels


def logit_scaled_confidence(logits, labels) -> jax.Array:
    """phi = log(p_y) - log(1 - p_y), with p = softmax(logits), computed stably.

    Since log p_y = z_y - logsumexp(z) and log(1 - p_y) = logsumexp_{k != y}(z_k)
    - logsumexp(z), phi = z_y - logsumexp_{k != y}(z_k): no probabilities are
    formed, so phi stays finite and accurate when p_y rounds to 0 or 1.

    Args:
      logits: (..., C) unnormalised log-probabilities, C >= 2; any leading
        axes, e.g. (num_models, N, A, C) with an augmentation axis A.
      labels: integer class indices broadcastable to logits.shape[:-1]
        (e.g. (N, 1) against (M, N, A, C)... or simply (N,) against (M, N, C)).

    Returns:
      phi of shape logits.shape[:-1] (nats of log-odds), dtype of logits.
    """
    logits, labels = _check_logits_labels(logits, labels)
    is_label = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    label_logit = jnp.sum(jnp.where(is_label, logits, 0), axis=-1)
    other = jax.nn.logsumexp(jnp.where(is_label, -jnp.inf, logits), axis=-1)
    return label_logit - other


def loss_scores(logits, labels) -> jax.Array:
    """Loss-threshold attack (Yeom et al. 2018): score = -cross-entropy = log p_y.

    Members tend to have lower loss. Shapes as in ``logit_scaled_confidence``;
    average the result over an augmentation axis before ``evaluate_attack``.
    """
    logits, labels = _check_logits_labels(logits, labels)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------
# LiRA (Carlini et al. 2022).


def _check_shadow_inputs(values, in_mask, name):
    values = np.asarray(values, dtype=np.float64)
    in_mask = np.asarray(in_mask)
    if values.ndim == 2:
        values = values[..., None]
    if values.ndim != 3:
        raise ValueError(f"{name} must have shape (M, N, A) or (M, N), got {values.shape}")
    if in_mask.shape != values.shape[:2]:
        raise ValueError(
            f"in_mask must have shape (M, N) = {values.shape[:2]}, got {in_mask.shape}")
    in_mask = checks.boolean_array(in_mask, "in_mask")
    num_models, num_examples, num_aug = values.shape
    if num_models < 2:
        raise ValueError(f"need M >= 2 models (one target, >= 1 shadow), got {num_models}")
    if num_examples == 0 or num_aug == 0:
        raise ValueError(f"{name} is empty, shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite; {int(np.sum(~np.isfinite(values)))} "
                         "entries are NaN or infinite")
    return values, in_mask


class _GaussianFit(NamedTuple):
    """Leave-one-model-out Gaussian fit for every (target m, example j, aug a).

    mean, var: (M, N, A); count: (M, N) number of shadows in the group.
    """
    mean: np.ndarray
    var: np.ndarray
    count: np.ndarray


def _fit_leave_one_out(centred, group, global_variance):
    """Fit N(mean, var) to the shadows of each target in ``group`` (M, N).

    For target m, example j the shadows are the models k != m with
    group[k, j]; mean and unbiased variance per augmentation. ``centred`` has
    each example's overall mean removed so the sum-of-squares form below does
    not cancel catastrophically.

    Variance: per example when global_variance is False and the example has
    >= 2 shadows in the group (and a positive spread), otherwise the pooled
    within-example variance of the group over all examples (per target and
    augmentation). NaN mean where the group has no shadows.
    """
    weight = group[..., None].astype(np.float64)                 # (M, N, 1)
    own_sum = weight * centred
    own_sq = weight * centred**2
    total = own_sum.sum(0, keepdims=True) - own_sum              # (M, N, A)
    total_sq = own_sq.sum(0, keepdims=True) - own_sq
    count = group.sum(0, keepdims=True) - group                  # (M, N)
    n = count[..., None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / n, np.nan)
        sq_dev = np.where(n > 0, np.maximum(total_sq - n * mean**2, 0.0), 0.0)
        dof = np.maximum(n - 1, 0.0)
        # Pooled over examples: sum of squared deviations / degrees of freedom.
        pooled = sq_dev.sum(1, keepdims=True) / dof.sum(1, keepdims=True)
        own = np.where(dof > 0, sq_dev / dof, 0.0)
    if not np.all(np.isfinite(pooled)):
        raise ValueError(
            "cannot estimate a variance: for some target, no example has two or "
            "more shadow models in its IN (or OUT) group; train more models")
    if global_variance:
        var = np.broadcast_to(pooled, mean.shape)
    else:
        var = np.where(own > 0, own, pooled)
    return _GaussianFit(mean=mean, var=np.maximum(var, _MIN_VARIANCE), count=count)


def _gaussian_logpdf(x, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


def lira_online(phi, in_mask, *, global_variance: bool = False) -> MembershipScores:
    """Online LiRA: Gaussian likelihood ratio of IN against OUT shadow models.

    For target m and example j, fit N(mu_in, s_in^2) to phi of the other
    models that trained on j and N(mu_out, s_out^2) to those that did not,
    separately for each augmentation a, and score

        sum_a [log N(phi_mja; mu_in_ja, s_in_ja^2) - log N(phi_mja; mu_out_ja, s_out_ja^2)]

    i.e. the augmentations are treated as independent (diagonal-covariance
    multivariate Gaussian, the "multivariate independent" form); means are
    per example and augmentation.

    Args:
      phi: (M, N, A) or (M, N) logit-scaled confidences (finite).
      in_mask: (M, N) bool, in_mask[m, j] = model m trained on example j.
      global_variance: one IN and one OUT variance per augmentation, pooled
        over examples (the paper's "fixed variance", better with few
        shadows), instead of per-example variances.

    Returns:
      MembershipScores(scores (M, N) in nats, is_member = in_mask). A
      per-example variance falls back to the pooled one when its group has
      fewer than 2 shadows (or zero spread). The score is NaN when example j
      has no IN or no OUT shadow for target m (no density to compare).

    Draw ``in_mask`` independently per model and example. If every example is
    IN in exactly M/2 models, leaving the target out leaves one IN shadow
    fewer exactly when the target is IN, and with few models (M <= 16) the
    worse fit of the smaller group alone moves the AUC away from 0.5 on data
    without any membership signal (docs/audit.md has the figures).
    """
    phi, in_mask = _check_shadow_inputs(phi, in_mask, "phi")
    centred = phi - phi.mean(0, keepdims=True)
    fit_in = _fit_leave_one_out(centred, in_mask, global_variance)
    fit_out = _fit_leave_one_out(centred, ~in_mask, global_variance)
    log_ratio = (_gaussian_logpdf(centred, fit_in.mean, fit_in.var)
                 - _gaussian_logpdf(centred, fit_out.mean, fit_out.var))
    return MembershipScores(scores=log_ratio.sum(-1), is_member=in_mask)


def lira_offline(phi, in_mask, *, global_variance: bool = False) -> MembershipScores:
    """Offline LiRA: how far phi lies in the upper tail of the OUT Gaussian.

    Only the shadow models that did NOT train on j are used (so the shadows
    need never train on the examples to audit). For target m and example j,

        score = -sum_a log P(Z_a >= phi_mja),   Z_a ~ N(mu_out_ja, s_out_ja^2)

    the one-sided test of Carlini et al. (their statistic 1 - P(Z > phi) is a
    monotone function of this for A = 1); with A augmentations the tails are
    multiplied as if independent. The log tail (``scipy.stats.norm.logsf``)
    keeps the score finite and resolved far in the tail, where 1 - P
    would round to 1.

    Args / fallbacks as in ``lira_online`` (OUT group only). NaN where
    example j has no OUT shadow for target m.
    """
    phi, in_mask = _check_shadow_inputs(phi, in_mask, "phi")
    centred = phi - phi.mean(0, keepdims=True)
    fit_out = _fit_leave_one_out(centred, ~in_mask, global_variance)
    z = (centred - fit_out.mean) / np.sqrt(fit_out.var)
    return MembershipScores(scores=-stats.norm.logsf(z).sum(-1), is_member=in_mask)


# ----------------------------------------------------------------------------
# RMIA (Zarifzadeh et al. 2024).


def _leave_one_out_mean(values, group):
    """Mean over the models k != m with group[k, j]: (M, N); NaN if none."""
    weight = group.astype(np.float64)
    own = weight * values
    total = own.sum(0, keepdims=True) - own
    count = weight.sum(0, keepdims=True) - weight
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _check_probabilities(p, name):
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 3:  # average an augmentation axis
        p = p.mean(-1)
    if p.ndim != 2:
        raise ValueError(f"{name} must have shape (M, n) or (M, n, A), got {p.shape}")
    if p.size == 0:
        raise ValueError(f"{name} is empty, shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"{name} must hold probabilities in [0, 1] (no NaN)")
    return p


def rmia(prob, in_mask, prob_population, *, offline_a: float | None = None,
         gamma: float = 1.0) -> MembershipScores:
    """RMIA: pairwise likelihood ratios against population samples.

    With p_k(x) the probability model k gives the true label of x (averaged
    over augmentations) and, for target m, Pr(x) = the average of p_k(x)
    over the reference models k != m,

        LR_m(x, z) = [p_m(x) / Pr(x)] / [p_m(z) / Pr(z)]
        score_m(x) = fraction of population samples z with LR_m(x, z) >= gamma

    (Zarifzadeh et al. 2024, eq. 4). Online (``offline_a=None``) Pr(x) is
    the mean over all reference models, IN and OUT alike (about half of each
    when models train on random halves). Offline, only OUT models are
    available and the missing IN half is approximated linearly,
    p_IN ~ a p_OUT + (1 - a), giving

        Pr(x) = ((1 + a) mean_OUT(x) + (1 - a)) / 2,

    applied to x and to z alike (the population samples are OUT for every
    model). a is calibrated on other data in the paper (a in [0, 1]; larger
    for models that generalise well; a = 1 means IN and OUT agree).

    Args:
      prob: (M, N) or (M, N, A) true-label probabilities p_k(x_j) of the pool
        (e.g. ``jax.nn.softmax(logits)[..., y]``); A is averaged.
      in_mask: (M, N) bool.
      prob_population: (M, Z) or (M, Z, A) true-label probabilities of Z
        population samples that no model trained on (e.g. a held-out set).
      offline_a: None for online RMIA; a in [0, 1] for offline.
      gamma: the likelihood-ratio threshold (>= 1 in the paper; 1 by default).

    Returns:
      MembershipScores(scores (M, N) in [0, 1], is_member = in_mask); scores
      take the Z + 1 values k / Z, so ties are common (the metrics handle
      them). NaN where x has no OUT reference model (offline) or no
      reference model with p > 0.
    """
    prob = _check_probabilities(prob, "prob")
    pop = _check_probabilities(prob_population, "prob_population")
    _, in_mask = _check_shadow_inputs(prob, in_mask, "prob")
    if pop.shape[0] != prob.shape[0]:
        raise ValueError(
            f"prob_population must have M = {prob.shape[0]} rows, got {pop.shape[0]}")
    gamma = checks.positive_finite(gamma, "gamma")
    everyone_pop = np.ones(pop.shape, dtype=bool)
    if offline_a is None:
        ref_x = _leave_one_out_mean(prob, np.ones_like(in_mask))
        ref_z = _leave_one_out_mean(pop, everyone_pop)
    else:
        if not 0 <= offline_a <= 1:
            raise ValueError(f"offline_a must lie in [0, 1], got {offline_a!r}")
        ref_x = 0.5 * ((1 + offline_a) * _leave_one_out_mean(prob, ~in_mask)
                       + (1 - offline_a))
        ref_z = 0.5 * ((1 + offline_a) * _leave_one_out_mean(pop, everyone_pop)
                       + (1 - offline_a))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio_x = np.where(ref_x > 0, prob / ref_x, np.nan)       # (M, N)
        ratio_z = np.where(ref_z > 0, pop / ref_z, np.nan)        # (M, Z)
    scores = np.empty(prob.shape, dtype=np.float64)
    # LR(x, z) >= gamma  <=>  ratio_z <= ratio_x / gamma: one sorted search per
    # target instead of an (N, Z) comparison.
    for m in range(prob.shape[0]):
        population = np.sort(ratio_z[m][~np.isnan(ratio_z[m])])
        if population.size == 0:
            raise ValueError(f"target {m}: no population sample has a defined ratio")
        counts = np.searchsorted(population, ratio_x[m] / gamma, side="right")
        scores[m] = np.where(np.isnan(ratio_x[m]), np.nan, counts / population.size)
    return MembershipScores(scores=scores, is_member=in_mask)


# ----------------------------------------------------------------------------
# Evaluation.


def evaluate_attack(scores, in_mask, *, fpr_levels=(1e-3, 1e-2)) -> AttackEvaluation:
    """Metrics of an attack with every model as target.

    Args:
      scores: (M, N) attack scores, higher = member; NaN entries (undefined
        tests) are excluded and counted in ``num_excluded``.
      in_mask: (M, N) bool ground truth.
      fpr_levels: FPR targets for ``tpr_at_fpr`` (0.1% and 1% by default;
        read one back by value with ``.tpr_at(fpr)``). With n0 non-members
        the FPR has resolution 1/n0: pooling the M targets is what makes
        0.1% meaningful (n0 >= 1000 needed).

    Returns:
      AttackEvaluation with pooled metrics (one threshold shared by all
      targets, as when the pairs are thrown together) and per-target ones.
    """
    scores = np.asarray(scores, dtype=np.float64)
    in_mask = np.asarray(in_mask)
    if scores.ndim != 2 or in_mask.shape != scores.shape:
        raise ValueError(
            f"scores and in_mask must both have shape (M, N), got {scores.shape} "
            f"and {in_mask.shape}")
    if np.any(np.isinf(scores)):
        raise ValueError("scores must not be infinite")
    levels = np.asarray(fpr_levels, dtype=np.float64).reshape(-1)
    valid = ~np.isnan(scores)
    pooled = metrics.roc(scores[valid], in_mask[valid])
    num_targets = scores.shape[0]
    per_auc = np.full(num_targets, np.nan)
    per_bacc = np.full(num_targets, np.nan)
    per_tpr = np.full((num_targets, levels.size), np.nan)
    for m in range(num_targets):
        member = in_mask[m][valid[m]].astype(bool)
        if member.size and 0 < member.sum() < member.size:
            s = scores[m][valid[m]]
            per_auc[m] = metrics.auc(s, member)
            per_bacc[m] = metrics.balanced_accuracy(s, member)
            per_tpr[m] = metrics.tpr_at_fpr(s, member, levels)
    pooled_scores, pooled_member = scores[valid], in_mask[valid]
    return AttackEvaluation(
        auc=metrics.auc(pooled_scores, pooled_member),
        balanced_accuracy=metrics.balanced_accuracy(pooled_scores, pooled_member),
        fpr_levels=levels,
        tpr_at_fpr=np.atleast_1d(metrics.tpr_at_fpr(pooled_scores, pooled_member, levels)),
        fpr=pooled.fpr,
        tpr=pooled.tpr,
        per_target_auc=per_auc,
        per_target_balanced_accuracy=per_bacc,
        per_target_tpr_at_fpr=per_tpr,
        num_excluded=int(np.sum(~valid)),
    )
