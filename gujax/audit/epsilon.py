"""Empirical epsilon: statistically valid lower bounds on the epsilon of a
training algorithm from canary guesses (privacy auditing).

The statistics are jax-privacy's (``jax_privacy.auditing``); gujax adds the
guess rule, the scores and the canaries (``gujax.audit.canaries``).

- ``epsilon_lower_bound(num_guesses, num_correct, *, num_canaries, delta,
  confidence)``: the one-run bound of Steinke, Nasr and Jagielski (NeurIPS
  2023, "Privacy Auditing with One (1) Training Run"): m canaries, each
  included with probability 1/2 independently; an auditor who guesses r of
  them and is right v times refutes (eps, delta)-DP at ``confidence`` when
  the chance of v or more right guesses, under the worst case such a
  mechanism allows, is below 1 - confidence. With delta = 0 this is the
  binomial tail: the largest eps with P[Binomial(r, e^eps / (1 + e^eps)) >=
  v] <= 1 - confidence; delta > 0 adds the term of their Theorem 3.
- ``one_run_epsilon(scores, is_in, ...)``: the bound for a guess rule fixed
  before looking at the bits: guess "in" for the top fraction f of the
  scores, for each f of a small grid, with Bonferroni over the grid (and
  over several score arrays, ``best_one_run_epsilon``). The guesses use the
  scores alone, never the bits.
- ``multi_run_epsilon(scores, in_mask, ...)``: the classic bound from many
  runs (Jagielski et al. 2020, Nasr et al. 2021): for one canary, its scores
  across independent runs, in and out, give Clopper-Pearson bounds on the
  best threshold's FPR and FNR (jax-privacy's ``epsilon_clopper_pearson``,
  Bonferroni over thresholds); over several canaries, the median of the
  per-canary bounds at half the significance, which is valid under any
  dependence between canaries (Markov's inequality on the count of bounds
  that exceed the truth).

Pooling canaries over runs: R independent runs with n canaries each are one
mechanism on R n canary slots, and each slot's canary appears in one run
only, so (eps, delta)-DP of a run is (eps, delta)-DP with respect to each
slot (parallel composition): the one-run bound applies to all R n slots.

Scores are "higher = member"; epsilon is in nats of privacy loss.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy import auditing

from gujax import checks
from gujax.data.dataset import model_inputs

# Guess "in" for this fraction of the canary slots with the highest scores.
GUESS_FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5)


def _confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return confidence


def _delta(delta: float, *, positive: bool = False) -> float:
    delta = float(delta)
    if not (0 < delta < 1 if positive else 0 <= delta < 1):
        raise ValueError(f"delta must be in {'(0' if positive else '[0'}, 1), got {delta!r}")
    return delta


def epsilon_lower_bound(num_guesses: int, num_correct: int, *, num_canaries: int,
                        delta: float, confidence: float = 0.95) -> float:
    """The one-run lower bound on epsilon (nats) of Steinke, Nasr and
    Jagielski (2023), module docstring: ``num_correct`` right guesses out of
    ``num_guesses`` among ``num_canaries`` canaries included independently
    with probability 1/2. 0 when the guesses refute no eps >= 0.

    Raises ValueError unless 0 <= num_correct <= num_guesses <= num_canaries
    (integers, num_canaries >= 1), 0 <= delta < 1 and 0 < confidence < 1.
    """
    m = checks.positive_int(num_canaries, "num_canaries")
    r = checks.positive_int(num_guesses, "num_guesses", minimum=0)
    v = checks.positive_int(num_correct, "num_correct", minimum=0)
    if not v <= r <= m:
        raise ValueError(f"need num_correct ({v}) <= num_guesses ({r}) <= num_canaries ({m})")
    delta = _delta(delta)
    significance = 1 - _confidence(confidence)
    if v == 0:
        return 0.0
    # jax-privacy's one-run computation (the p-value of their Theorem 3 and its
    # root in eps), which its public auditor calls per threshold; it also takes
    # delta = 0, which the public method refuses.
    return float(auditing._epsilon_one_run(0.0, m, r, v, significance, delta))


class OneRunBound(NamedTuple):
    """A one-run audit's result.

    epsilon: the lower bound (nats) at ``confidence``; 0 if nothing refuted.
    num_guesses, num_correct: r and v at the guess count that gave it.
    num_canaries: m (canary slots).
    threshold: the score at and above which the canaries were guessed "in".
    test: which of the score arrays gave it (``best_one_run_epsilon``), else "".
    num_tests: the number of (score array, guess fraction) pairs the
      significance was divided among (Bonferroni).
    """
    epsilon: float
    num_guesses: int
    num_correct: int
    num_canaries: int
    threshold: float
    confidence: float
    delta: float
    method: str
    test: str = ""
    num_tests: int = 1

    def summary(self) -> dict:
        return self._asdict()


def _scores_and_bits(scores, is_in) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).ravel()
    is_in = checks.boolean_array(is_in, "is_in").ravel()
    if scores.shape != is_in.shape or scores.size == 0:
        raise ValueError(f"scores and is_in must have the same non-zero size, got "
                         f"{np.shape(scores)} and {np.shape(is_in)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    if is_in.all() or not is_in.any():
        raise ValueError("is_in must hold both included and left-out canaries")
    return scores, is_in


def best_one_run_epsilon(tests: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                         delta: float, confidence: float = 0.95,
                         guess_fractions: Sequence[float] = GUESS_FRACTIONS,
                         method: str = "steinke") -> OneRunBound:
    """The largest one-run bound over several score arrays and guess
    fractions, with ``1 - confidence`` shared among all (Bonferroni), so the
    result is a lower bound at ``confidence``.

    Args:
      tests: name -> (scores (m,), is_in (m,) bool), e.g. a loss score and a
        LiRA-style score of the same canaries, or different canary sets.
      delta: in (0, 1), the delta of the (eps, delta) claim under test.
      guess_fractions: the grid, each in (0, 1]: guess "in" for the ceil(f m)
        highest scores (and any score tied with the last of them).
      method: "steinke" (``epsilon_lower_bound``; jax-privacy's
        ``epsilon_one_run``) or "fdp" (Mahloujifar et al. 2024, jax-privacy's
        ``epsilon_one_run_fdp``: the same guesses, tested against the
        trade-off curve of a Gaussian mechanism, tighter for DP-SGD).
    """
    checks.one_of(method, ("steinke", "fdp"), "method")
    delta = _delta(delta, positive=True)
    confidence = _confidence(confidence)
    fractions = tuple(float(f) for f in guess_fractions)
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"guess_fractions must be non-empty, each in (0, 1], got {fractions}")
    if not tests:
        raise ValueError("tests must name one or more (scores, is_in) pairs")
    num_tests = len(tests) * len(fractions)
    significance = (1 - confidence) / num_tests
    best = None
    for name, (scores, is_in) in tests.items():
        scores, is_in = _scores_and_bits(scores, is_in)
        auditor = auditing.CanaryScoreAuditor(scores[is_in], scores[~is_in])
        ordered = np.sort(scores)[::-1]
        for f in fractions:
            threshold = float(ordered[min(len(scores), math.ceil(f * len(scores))) - 1])
            guessed = scores >= threshold
            r, v = int(guessed.sum()), int((guessed & is_in).sum())
            if method == "steinke":
                eps = epsilon_lower_bound(r, v, num_canaries=len(scores), delta=delta,
                                          confidence=1 - significance)
            else:
                eps = float(auditor.epsilon_one_run_fdp(
                    significance, delta, threshold_strategy=auditing.Explicit(threshold)))
            if best is None or eps > best.epsilon:
                best = OneRunBound(eps, r, v, len(scores), threshold, confidence, delta,
                                   method, name, num_tests)
    return best


def one_run_epsilon(scores, is_in, *, delta: float, confidence: float = 0.95,
                    guess_fractions: Sequence[float] = GUESS_FRACTIONS,
                    method: str = "steinke") -> OneRunBound:
    """``best_one_run_epsilon`` for one score array: scores (m,) of the m
    canary slots (higher = member), is_in (m,) their true bits."""
    return best_one_run_epsilon({"": (scores, is_in)}, delta=delta, confidence=confidence,
                                guess_fractions=guess_fractions, method=method)


def multi_run_epsilon(scores, in_mask, *, delta: float, confidence: float = 0.95) -> float:
    """The multi-run lower bound (nats) from R independent runs.

    Args:
      scores: (R, n) the score of canary j in run r (higher = member), each
        run scored from its own output (and outputs independent of the
        audited runs' bits, e.g. reference models with no canaries).
      in_mask: (R, n) bool, run r trained on canary j.

    For n = 1: jax-privacy's ``epsilon_clopper_pearson`` on the canary's IN
    and OUT scores (Bonferroni over thresholds). For n > 1: the median over
    the canaries with both IN and OUT runs of their bounds at half the
    significance (module docstring). ValueError if no canary has both.
    """
    scores = np.asarray(scores, np.float64)
    in_mask = checks.boolean_array(in_mask, "in_mask")
    if scores.ndim != 2 or scores.shape != in_mask.shape:
        raise ValueError(f"scores and in_mask must be (R, n) of one shape, got "
                         f"{scores.shape} and {in_mask.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    delta = _delta(delta)
    significance = 1 - _confidence(confidence)
    usable = [j for j in range(scores.shape[1]) if 0 < in_mask[:, j].sum() < len(in_mask)]
    if not usable:
        raise ValueError("no canary was both in and out of some run")
    if scores.shape[1] > 1:
        significance /= 2
    if significance >= 0.5:
        raise ValueError("confidence too low for a Clopper-Pearson bound (needs > 0.5, "
                         "> 0.75 for several canaries)")
    bounds = [float(auditing.CanaryScoreAuditor(
        scores[in_mask[:, j], j], scores[~in_mask[:, j], j]).epsilon_clopper_pearson(
            significance, delta)) for j in usable]
    return bounds[0] if scores.shape[1] == 1 else float(np.median(bounds))


def attack_auc(scores, is_in, *, bootstrap_samples: int = 200, seed: int = 0,
               confidence: float = 0.95) -> tuple[float, float, float]:
    """(AUC, lower, upper): the canary attack's ROC AUC and its bootstrap
    interval (jax-privacy's ``attack_auroc``, bias-corrected percentile
    bootstrap over the canary slots; an interval of the estimate, not a
    bound on any epsilon)."""
    scores, is_in = _scores_and_bits(scores, is_in)
    auditor = auditing.CanaryScoreAuditor(scores[is_in], scores[~is_in])
    lo, hi = auditor.attack_auroc(bootstrap_params=auditing.BootstrapParams.confidence_interval(
        num_samples=checks.positive_int(bootstrap_samples, "bootstrap_samples"),
        confidence=_confidence(confidence), seed=seed))
    return float(auditor.attack_auroc()), float(lo), float(hi)


# ----------------------------------------------------------------------------
# Scores.

def canary_logits(model, params_list: Sequence, images: np.ndarray) -> np.ndarray:
    """(R, n, C) float64 logits of each of R parameter sets on the n images
    (uint8 pixels or float features, ``gujax.data.model_inputs``)."""
    apply = jax.jit(lambda p, x: model.apply({"params": p}, model_inputs(x)))
    return np.stack([np.asarray(apply(p, images), np.float64) for p in params_list])


def _label_log_probs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p_y and log(1 - p_y), from logits (..., n, C) without forming p."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    z_y = np.take_along_axis(logits, np.broadcast_to(labels[:, None], logits.shape[:-1] + (1,)),
                             -1)[..., 0]
    others = np.where(np.arange(logits.shape[-1]) == labels[:, None], -np.inf, logits)
    lse_all = np.logaddexp.reduce(logits, axis=-1)
    lse_others = np.logaddexp.reduce(others, axis=-1)
    return z_y - lse_all, lse_others - lse_all


def canary_loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(R, n) log p_y (minus the loss, nats) of logits (R, n, C) at the
    canaries' labels (n,): the loss-threshold score."""
    return _label_log_probs(logits, labels)[0]


def reference_scores(logits: np.ndarray, reference_logits: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
    """(R, n) LiRA-style offline scores: the canary's logit-scaled
    confidence phi = log p_y - log(1 - p_y) (nats of log-odds), standardised
    by the phi of reference models that never saw any canary:
    (phi - mean_ref_j) / s, s the reference spread pooled over canaries
    (ddof = 1 per canary). Reference models trained by the auditor, apart
    from the audited runs, keep the guesses a function of the audited
    output alone (Steinke et al.'s condition); with the few references a
    pooled spread is the stable choice (Carlini et al. 2022).

    logits (R, n, C), reference_logits (Q, n, C) with Q >= 2, labels (n,).
    """
    log_p, log_q = _label_log_probs(logits, labels)
    ref_p, ref_q = _label_log_probs(reference_logits, labels)
    if ref_p.ndim != 2 or ref_p.shape[0] < 2 or ref_p.shape[1] != log_p.shape[-1]:
        raise ValueError(f"reference_logits must be (Q >= 2, n={log_p.shape[-1]}, C), got "
                         f"{np.shape(reference_logits)}")
    phi, ref = log_p - log_q, ref_p - ref_q
    mean = ref.mean(0)
    spread = math.sqrt(((ref - mean) ** 2).sum() / (ref.size - ref.shape[1]))
    return (phi - mean) / max(spread, 1e-12)


def _first_kernel(params) -> jax.Array:
    if not isinstance(params, Mapping) or "Dense_0" not in params or \
            "kernel" not in params["Dense_0"]:
        raise ValueError("white-box dirac scores need a model whose first layer is a Dense "
                         "named Dense_0 on the flattened input (gujax.models.MLP)")
    return params["Dense_0"]["kernel"]


def dirac_scores(model, init_params: Sequence, params: Sequence, canaries) -> np.ndarray:
    """(R, n) white-box scores of dirac canaries (``gujax.audit.canaries``):
    the cosine between the change of the first kernel's row at canary j's
    pixel, W_T[p_j] - W_0[p_j], and the descent direction of j's own loss on
    that row at initialisation, -d loss_j / d W[p_j] (at W_0). Training on j
    moves the row along its gradient; the other data barely touch the row.

    init_params, params: R parameter sets before and after training, of an
    MLP (first layer ``Dense_0`` on the flattened input).
    """
    if canaries.kind != "dirac":
        raise ValueError(f"dirac_scores scores dirac canaries, got {canaries.kind!r}")
    if len(init_params) != len(params) or not params:
        raise ValueError("need one initial parameter set per trained one")
    size = int(np.prod(canaries.images.shape[1:]))
    if _first_kernel(params[0]).shape[0] != size:
        raise ValueError(f"the first kernel has {_first_kernel(params[0]).shape[0]} inputs, "
                         f"not the {size} pixels of the canaries")
    pixels = jnp.asarray(canaries.pixels)
    x = model_inputs(canaries.images)
    y = jnp.asarray(canaries.labels)

    def loss(p, image, label):
        logits = model.apply({"params": p}, image[None])[0]
        return -jax.nn.log_softmax(logits)[label]

    @jax.jit
    def score(p0, p1):
        grads = jax.vmap(lambda image, label: _first_kernel(
            jax.grad(loss)(p0, image, label)), in_axes=(0, 0))(x, y)       # (n, D, H)
        g = -grads[jnp.arange(len(pixels)), pixels]                          # (n, H)
        change = (_first_kernel(p1) - _first_kernel(p0))[pixels]            # (n, H)
        norms = jnp.linalg.norm(g, axis=1) * jnp.linalg.norm(change, axis=1)
        return jnp.sum(g * change, axis=1) / jnp.maximum(norms, 1e-30)

    return np.stack([np.asarray(score(p0, p1), np.float64)
                     for p0, p1 in zip(init_params, params)])

