"""Membership inference on a ``ShadowRecord``: each model in turn the
target, the others its shadows (LiRA online/offline, loss, RMIA), and
disclosure against LiRA vulnerability."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gujax import checks
from gujax.audit.attacks import (evaluate_attack, lira_offline, lira_online,
                                 logit_scaled_confidence, loss_scores, rmia)
from gujax.audit.metrics import AttackEvaluation
from gujax.audit.shadow.record import ShadowRecord
from gujax.audit.vulnerability import (DisclosureVsVulnerability,
                                       disclosure_vs_vulnerability,
                                       per_example_vulnerability)


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
    """
    evaluations: dict[str, AttackEvaluation]
    lira_scores: np.ndarray
    vulnerability: np.ndarray
    disclosure: np.ndarray
    disclosure_vs_vulnerability: DisclosureVsVulnerability | None


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
           ks=(10, 50, 100), rmia_offline_a: float = 0.5) -> ShadowAudit:
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
        shadows are few (M - 1 < 64), as Carlini et al. advise.
      ks: top-k precision of D_j against LiRA vulnerability (k > N dropped).
    """
    names = checks.subset(record.augmentations if augmentations is None else augmentations,
                          record.augmentations, "augmentations (of the recorded queries)")
    queries = [record.augmentations.index(a) for a in names]
    logits = record.logits[:, :, queries]
    population_logits = record.population_logits[:, :, queries]
    labels = record.pool_labels
    in_mask = record.in_mask
    if global_variance is None:
        global_variance = in_mask.shape[0] - 1 < 64
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
    vulnerability = per_example_vulnerability(*online)
    disclosure = mean_over_members(record.disclosure.astype(np.float64), in_mask)
    # top-k is over the examples that have both a D_j and a LiRA score.
    both = int(np.sum(np.isfinite(disclosure) & np.isfinite(vulnerability)))
    ks = tuple(k for k in ks if k <= both) or (1,)
    # A run that kept no ledger (DP-SGD with ledger=False) has no D_j at all.
    relation = (disclosure_vs_vulnerability(disclosure, vulnerability, ks=ks)
                if both >= 3 else None)
    return ShadowAudit(evaluations, np.asarray(online.scores), vulnerability, disclosure,
                       relation)
