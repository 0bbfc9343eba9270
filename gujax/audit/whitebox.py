"""White-box, all-iterates auditing with gradient-space canaries (Nasr et
al. 2023, "Tight auditing of differentially private machine learning").

The auditor inserts canaries whose per-example gradient it chooses, sees
every iterate of training, and reads from each canary's coordinates how
often its gradient entered a step. Here a canary is a *Dirac* gradient: the
training parameters get one extra leaf, ``CANARY_LEAF`` (m,) zeros that the
model never reads, and canary row j's loss is ``norm_j * theta[CANARY_LEAF][k_j]``,
so its gradient is exactly ``norm_j e_{k_j}``: L2 norm ``norm_j``, orthogonal
to every real gradient and to every other slot's. Real rows have zero
gradient in that leaf. Canaries are rows of the training set like any
other: sampled, clipped, weighed by the policy, noised and accounted by the
same code (``gujax.arms.train_runs``), so the audit tests the implementation,
not a model of it.

Slot k is IN with probability 1/2, independently (``canary_slots``); an IN
slot contributes ``copies`` rows with distinct ids and the same gradient,
the duplicated-canary attack on a defense that judges uniqueness. The
update of coordinate k at step t, with the optimiser undone
(``canary_updates``), is in units of the canary's norm

    u_t = (number of the slot's copies the policy admitted) * w + noise,

with w = 1 / (expected batch) for DP-SGD (noise std sigma C / norm there).

Scores per slot (higher = IN; ``canary_scores``):
- ``sum``: sum_t u_t, the Neyman-Pearson statistic of the full-batch
  Gaussian mechanism (every row in every step), where IN and OUT are exactly
  N(T, T s^2) and N(0, T s^2);
- ``likelihood_ratio`` (DP-SGD, sigma and the sample rate known): sum_t of
  log E_J[exp((2 J u_t - J^2) / (2 s^2))], J ~ Binomial(copies, q): the
  log-likelihood ratio of IN against OUT for Poisson sampling, the optimal
  test of the composed subsampled Gaussian.

Estimates (``audit_scores``), all from one run's m slots:
- ``one_run``: Steinke, Nasr and Jagielski's bound (``gujax.audit.epsilon``);
- ``one_run_fdp``: Mahloujifar et al.'s f-DP version of it;
- ``gdp_bound`` (``gdp_lower_bound``): Clopper-Pearson upper bounds on FPR
  and FNR at every threshold (Bonferroni over 2 x thresholds), each pair read
  as mu >= Phi^-1(1 - FPR) - Phi^-1(FNR) (valid when the mechanism's
  trade-off curve is Gaussian, as with Dirac canaries in full batches), the
  largest mu converted to epsilon. jax-privacy's ``epsilon_from_gdp`` is the
  same computation but takes |mu|: a threshold above every score (FPR bound
  0.006, FNR bound 0.99994 with 1,000 + 1,000 slots) then gives |mu| = 1.36,
  epsilon 6.3 for a mechanism whose true mu is 0.23 (tests/test_whitebox.py).
  The reversed test needs *lower* bounds on FPR and FNR, so that |mu| is not
  a bound; ours keeps the one-sided mu and equals theirs whenever their
  largest |mu| is a positive mu;
- ``gdp_estimate``: the point estimate of Nasr et al.: IN and OUT scores
  fitted as Gaussians, mu = (mean_in - mean_out) / pooled std, and epsilon
  at delta from mu (``gdp_epsilon``), with a bootstrap interval;
- ``ceiling``, ``ceiling_fdp``: what a perfect attack would show with these
  slots under the one-run and the f-DP one-run bound (the f-DP bound's is
  higher: it reads more from the same guesses).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy import auditing
from scipy import optimize, special, stats

from gujax import checks
from gujax.audit.epsilon import best_one_run_epsilon

PyTree = Any
CANARY_LEAF = "gradient_canaries"
MODEL_LEAF = "model"
# The rows' extra entries: the slot a canary row writes to (-1: a real row)
# and its gradient's L2 norm.
SLOT_KEY, NORM_KEY = "canary_slot", "canary_norm"


class GradientCanaries(NamedTuple):
    """m gradient-canary slots of one training run.

    is_in: (m,) bool, slot k's rows are in the training set.
    norms: (m,) float, the L2 norm of each of slot k's gradients (gradient
      units of the loss).
    copies: rows per IN slot (distinct ids, one gradient).
    """
    is_in: np.ndarray
    norms: np.ndarray
    copies: int = 1

    @property
    def num_slots(self) -> int:
        return len(self.is_in)


def canary_slots(num_slots: int, *, norm: float, seed: int, copies: int = 1
                 ) -> GradientCanaries:
    """``num_slots`` slots, each IN with probability 1/2 independently (the
    one-run game), every gradient of L2 norm ``norm``."""
    m = checks.positive_int(num_slots, "num_slots")
    checks.positive_finite(norm, "norm")
    checks.seed(seed)
    is_in = np.random.default_rng([seed, 0x61]).random(m) < 0.5
    return GradientCanaries(is_in, np.full(m, float(norm)),
                            checks.positive_int(copies, "copies"))


def with_canary_leaf(params: PyTree, canaries: GradientCanaries) -> dict:
    """The training parameters: ``{MODEL_LEAF: params, CANARY_LEAF: zeros (m,)}``."""
    return {MODEL_LEAF: params, CANARY_LEAF: jnp.zeros((canaries.num_slots,), jnp.float32)}


def canary_loss(loss_fn: Callable[[PyTree, dict], jax.Array]) -> Callable[[dict, dict], jax.Array]:
    """The loss over ``with_canary_leaf`` parameters and ``canary_data`` rows:
    ``loss_fn(params[MODEL_LEAF], example)`` for a real row, and
    ``norm * params[CANARY_LEAF][slot]`` for a canary row (gradient exactly
    ``norm e_slot``; the model part of its gradient is zero)."""
    def loss(params, example):
        slot = example[SLOT_KEY]
        real = {k: v for k, v in example.items() if k not in (SLOT_KEY, NORM_KEY)}
        model_loss = loss_fn(params[MODEL_LEAF], real)
        canary = example[NORM_KEY] * params[CANARY_LEAF][jnp.maximum(slot, 0)]
        return jnp.where(slot >= 0, canary, model_loss)
    return loss


def canary_data(images: np.ndarray, labels: np.ndarray, canaries: GradientCanaries) -> dict:
    """The training set as ``gujax.train`` takes it: the N real rows (ids
    0..N-1), then ``copies`` rows of each IN slot (ids N, N+1, ...; a zero
    image and label 0 that the canary loss never reads)."""
    images, labels = np.asarray(images), np.asarray(labels)
    n = len(images)
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"need images (N, ...) and labels (N,) with N >= 1, got "
                         f"{images.shape} and {labels.shape}")
    slots = np.repeat(np.flatnonzero(canaries.is_in), canaries.copies).astype(np.int32)
    extra = len(slots)
    return {
        "image": np.concatenate([images, np.zeros((extra,) + images.shape[1:], images.dtype)]),
        "label": np.concatenate([labels.astype(np.int32), np.zeros(extra, np.int32)]),
        SLOT_KEY: np.concatenate([np.full(n, -1, np.int32), slots]),
        NORM_KEY: np.concatenate([np.zeros(n, np.float32),
                                  canaries.norms[slots].astype(np.float32)]),
        "id": np.arange(n + extra, dtype=np.int32),
    }


def observe_canaries(params: dict) -> jax.Array:
    """What the auditor reads after each step (``train_runs(observe=)``)."""
    return params[CANARY_LEAF]


def canary_updates(iterates: np.ndarray, *, learning_rate: float, momentum: float = 0.0
                   ) -> np.ndarray:
    """The stage's update in the canary coordinates at every step, (T, m),
    from the iterates after each step (T, m) (the leaf starts at zero): SGD
    with heavy-ball momentum (optax.sgd) undone, g_t = m_t - momentum m_{t-1}
    with m_t = -(theta_t - theta_{t-1}) / lr."""
    theta = np.asarray(iterates, np.float64)
    if theta.ndim != 2 or len(theta) == 0:
        raise ValueError(f"iterates must be (T, m) with T >= 1, got {theta.shape}")
    checks.positive_finite(learning_rate, "learning_rate")
    checks.fraction(momentum, "momentum")
    traces = -np.diff(np.concatenate([np.zeros((1, theta.shape[1])), theta]), axis=0)
    traces /= learning_rate
    updates = traces.copy()
    updates[1:] -= momentum * traces[:-1]
    return updates


def _log_likelihood_ratio(u: np.ndarray, noise_std: float, sample_rate: float,
                          copies: int) -> np.ndarray:
    """sum_t log sum_j Binom(j; copies, q) exp((2 j u_t - j^2) / (2 s^2)), (m,)."""
    j = np.arange(copies + 1, dtype=np.float64)
    log_prior = stats.binom.logpmf(j, copies, sample_rate)
    exponent = (2 * j * u[..., None] - j ** 2) / (2 * noise_std ** 2)
    return special.logsumexp(log_prior + exponent, axis=-1).sum(axis=0)


def canary_scores(updates: np.ndarray, canaries: GradientCanaries, *, expected_batch_size: float,
                  noise_std: float | None = None, sample_rate: float | None = None
                  ) -> dict[str, np.ndarray]:
    """The slots' scores (module docstring), name -> (m,).

    updates: (T, m) from ``canary_updates``.
    expected_batch_size: what the policy divides the sum by (DP-SGD's B; 1
      for a policy that sums).
    noise_std: the noise's std in gradient units (sigma C), with
      ``sample_rate`` q; both given: the likelihood-ratio score too.
    """
    updates = np.asarray(updates, np.float64)
    if updates.ndim != 2 or updates.shape[1] != canaries.num_slots:
        raise ValueError(f"updates must be (T, {canaries.num_slots}), got {updates.shape}")
    if not np.all(np.isfinite(updates)):
        raise ValueError("updates must be finite")
    u = updates * float(expected_batch_size) / canaries.norms
    scores = {"sum": u.sum(axis=0)}
    if (noise_std is None) != (sample_rate is None):
        raise ValueError("give noise_std and sample_rate together")
    if noise_std is not None and noise_std > 0:
        checks.rate(sample_rate)
        s = float(noise_std) / canaries.norms
        scores["likelihood_ratio"] = np.array([
            _log_likelihood_ratio(u[:, k], s[k], sample_rate, canaries.copies)
            for k in range(canaries.num_slots)])
    return scores


def gdp_epsilon(mu: float, delta: float) -> float:
    """epsilon (nats) of mu-GDP at ``delta``: the root of
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta (Dong, Roth and
    Su, Corollary 2.13); 0 when mu-GDP already meets delta at eps = 0."""
    mu = abs(float(mu))
    delta = checks.probability(delta, "delta")
    if mu == 0:
        return 0.0

    def gap(eps):
        a = stats.norm.logcdf(-eps / mu + mu / 2)
        b = eps + stats.norm.logcdf(-eps / mu - mu / 2)
        return a + np.log1p(-np.exp(min(b - a, 0.0))) - np.log(delta) if b < a else -np.inf

    if gap(0.0) <= 0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-9))


def slot_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                 copies: int = 1) -> float:
    """The accountant's epsilon (PLD, nats) of one canary slot: ``copies``
    rows, each Poisson-sampled at ``sample_rate``, under ``steps`` steps of
    noise ``noise_multiplier`` (in units of the clip norm, each row's
    gradient at most the clip norm). Per step the slot adds J ~ Binomial(
    copies, q) clipped gradients, a mixture of Gaussians with sensitivities
    0..copies (dp_accounting's ``from_mixture_gaussian_mechanism``); for one
    copy it is DP-SGD's own PLD epsilon (tests/test_whitebox.py), for q = 1
    the Gaussian mechanism of sensitivity ``copies``. Group privacy of the
    copies, without the factor-k loss of the generic group theorem."""
    from dp_accounting.pld import privacy_loss_distribution

    checks.positive_finite(noise_multiplier, "noise_multiplier")
    checks.rate(sample_rate)
    steps = checks.positive_int(steps, "steps")
    copies = checks.positive_int(copies, "copies")
    j = np.arange(copies + 1)
    probs = stats.binom.pmf(j, copies, sample_rate)
    keep = probs > 0
    loss = privacy_loss_distribution.from_mixture_gaussian_mechanism(
        float(noise_multiplier), [float(x) for x in j[keep]], [float(x) for x in probs[keep]])
    return float(loss.self_compose(steps).get_epsilon_for_delta(checks.probability(delta,
                                                                                   "delta")))


def gdp_mu(scores, is_in) -> float:
    """Nasr et al.'s fit: (mean IN - mean OUT) / sqrt((var IN + var OUT) / 2)."""
    scores = np.asarray(scores, np.float64)
    is_in = checks.boolean_array(is_in, "is_in")
    a, b = scores[is_in], scores[~is_in]
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need two or more IN and two or more OUT scores")
    spread = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    if spread == 0:
        return math.inf if a.mean() != b.mean() else 0.0
    return float((a.mean() - b.mean()) / spread)


def gdp_lower_bound(scores, is_in, *, delta: float, confidence: float = 0.95) -> float:
    """The GDP lower bound on epsilon (nats) of the module docstring, for
    scores (m,) (higher = IN) and their bits is_in (m,)."""
    scores = np.asarray(scores, np.float64)
    is_in = checks.boolean_array(is_in, "is_in")
    if scores.shape != is_in.shape or is_in.all() or not is_in.any():
        raise ValueError("need scores and is_in of one shape, with IN and OUT slots")
    delta = checks.probability(delta, "delta")
    auditor = auditing.CanaryScoreAuditor(scores[is_in], scores[~is_in])
    fn, tn = auditor._fn_counts, auditor._tn_counts
    significance = (1 - confidence) / (2 * len(fn))
    fnr = auditing._clopper_pearson_upper(fn, fn[-1], significance)
    fpr = auditing._clopper_pearson_upper(tn[-1] - tn, tn[-1], significance)
    keep = np.maximum(fpr, fnr) < 1 - delta
    if not keep.any():
        return 0.0
    mu = float(np.max(stats.norm.isf(fpr[keep]) - stats.norm.ppf(fnr[keep])))
    return gdp_epsilon(mu, delta) if mu > 0 else 0.0


class WhiteboxAudit(NamedTuple):
    """One run's audit (``audit_scores``); epsilons in nats.

    one_run, one_run_fdp: ``OneRunBound.summary()`` dicts (best over the
      score arrays, Bonferroni). gdp_bound: jax-privacy's epsilon_from_gdp at
      ``confidence`` on ``gdp_score``. gdp_mu, gdp_estimate: the Gaussian
      fit and its epsilon; gdp_interval: a bootstrap interval of the
      estimate over the slots. ceiling, ceiling_fdp: what the one-run and
      f-DP one-run bounds give for a perfect attack on these slots (the
      most any attack can show with them).
    """
    one_run: dict
    one_run_fdp: dict
    gdp_score: str
    gdp_bound: float
    gdp_mu: float
    gdp_estimate: float
    gdp_interval: tuple[float, float]
    ceiling: float
    ceiling_fdp: float
    num_slots: int
    num_in: int

    def summary(self) -> dict:
        return self._asdict()


def audit_scores(scores: Mapping[str, np.ndarray], is_in, *, delta: float,
                 confidence: float = 0.95, bootstrap_samples: int = 1000,
                 seed: int = 0) -> WhiteboxAudit:
    """Every estimate of the module docstring from one run's slot scores.
    The GDP fit uses ``likelihood_ratio`` when present, else ``sum``."""
    is_in = checks.boolean_array(is_in, "is_in")
    tests = {name: (np.asarray(s, np.float64), is_in) for name, s in scores.items()}
    one_run = best_one_run_epsilon(tests, delta=delta, confidence=confidence)
    fdp = best_one_run_epsilon(tests, delta=delta, confidence=confidence, method="fdp")
    perfect = {"perfect": (is_in.astype(float), is_in)}
    ceiling = best_one_run_epsilon(perfect, delta=delta, confidence=confidence)
    ceiling_fdp = best_one_run_epsilon(perfect, delta=delta, confidence=confidence,
                                       method="fdp")
    name = "likelihood_ratio" if "likelihood_ratio" in scores else "sum"
    s = tests[name][0]
    bound = gdp_lower_bound(s, is_in, delta=delta, confidence=confidence)
    mu = gdp_mu(s, is_in)
    rng = np.random.default_rng([seed, 0x6d75])
    inside, outside = np.flatnonzero(is_in), np.flatnonzero(~is_in)
    boot = []
    for _ in range(bootstrap_samples):
        rows = np.concatenate([rng.choice(inside, len(inside)), rng.choice(outside, len(outside))])
        boot.append(gdp_epsilon(min(gdp_mu(s[rows], is_in[rows]), 50.0), delta))
    lo, hi = np.percentile(boot, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return WhiteboxAudit(one_run.summary(), fdp.summary(), name, bound, mu,
                         gdp_epsilon(min(mu, 50.0), delta), (float(lo), float(hi)),
                         ceiling.epsilon, ceiling_fdp.epsilon, len(is_in), int(is_in.sum()))


class WhiteboxRun(NamedTuple):
    """``whitebox_audit``'s result for one run of an arm.

    audit: the ``WhiteboxAudit``. scores: name -> (m,) slot scores.
    updates: (T, m) the canary coordinates' updates. accountant_epsilon,
    noise_multiplier: the arm's (DP kinds; else None). admitted: (m,) steps
    in which some copy of slot k entered the update (its coordinate moved;
    for a noiseless policy, exactly the admitted steps). disclosure: (m,)
    the ledger's D of each IN slot's first copy (NaN without a ledger or
    for OUT slots). params: the trained model parameters.
    """
    audit: WhiteboxAudit
    scores: dict
    updates: np.ndarray
    accountant_epsilon: float | None
    noise_multiplier: float | None
    admitted: np.ndarray
    disclosure: np.ndarray
    params: PyTree


def whitebox_audit(arm, images: np.ndarray, labels: np.ndarray, params: PyTree,
                   canaries: GradientCanaries, config, *, loss_fn, seed: int, delta: float,
                   confidence: float = 0.95, bootstrap_samples: int = 1000) -> WhiteboxRun:
    """Train one run of ``arm`` (``gujax.arms.train_runs``, explicit engine)
    on the real rows plus the IN canary rows, observe the canary leaf after
    every step and audit it (module docstring).

    config: the ``TrainConfig`` (optimizer "sgd"; the arm's batch and lr
    override it); loss_fn: the model's per-example loss; delta: of the
    (eps, delta) claim under test.
    """
    from gujax.arms import TrainingRun, train_runs  # arms imports the audit's users

    if config.optimizer != "sgd":
        raise ValueError("the white-box audit undoes optax.sgd (with momentum); got "
                         f"optimizer {config.optimizer!r}")
    data = canary_data(images, labels, canaries)
    run, = train_runs(arm, [TrainingRun(data, seed, with_canary_leaf(params, canaries))],
                      config, loss_fn=canary_loss(loss_fn), method="explicit",
                      observe=observe_canaries)
    cfg = run.config
    updates = canary_updates(run.iterates, learning_rate=cfg.learning_rate,
                             momentum=cfg.momentum)
    noisy = run.noise_multiplier is not None
    scores = canary_scores(
        updates, canaries, expected_batch_size=cfg.batch_size if noisy else 1.0,
        noise_std=run.noise_multiplier * arm.clip_norm if noisy else None,
        sample_rate=cfg.batch_size / len(data["id"]) if noisy else None)
    audit = audit_scores(scores, canaries.is_in, delta=delta, confidence=confidence,
                         bootstrap_samples=bootstrap_samples, seed=seed)
    disclosure = np.full(canaries.num_slots, np.nan)
    if run.ledger is not None:
        first = len(images) + np.arange(0, int(canaries.is_in.sum()) * canaries.copies,
                                        canaries.copies)
        disclosure[canaries.is_in] = np.asarray(run.ledger.disclosure)[first]
    return WhiteboxRun(audit, scores, updates, run.epsilon, run.noise_multiplier,
                       (updates != 0).sum(axis=0), disclosure, run.params[MODEL_LEAF])
