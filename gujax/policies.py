"""Policies: what to do with each example's gradient, decided from the Gram matrix.

A policy never sees a gradient. It sees the step's batch statistics
(``BatchStats``: the (B,) squared norms ||g_j||^2 always, the (B + R, B + R)
Gram matrix K of the B batch rows then R reference rows only when it reads
cross terms), the examples' ids and the padding mask, and its own state, and
returns one weight per batch row; the gradient engine (``gujax.engine``) then
forms sum_j w_j g_j and the policy finishes it into the update (DP-SGD adds
its noise there):

    stats = engine_pass.statistics(policy.cross_terms)
    weights, state = policy.weights(stats, example_ids, mask, state)
    update, state = policy.finish(engine_pass.weighted_sum(weights, stats), state)

``Policy.cross_terms`` says whether the policy reads K's off-diagonal
entries; when it does not (plain DP-SGD and the mean need only the squared
norms) the engine never forms the B x B cross terms.

What a run owns lives in its state, never in the policy's closure: the
ledger, and DP-SGD's noise key, sigma, clip norm and expected batch size
(``DpsgdState``). So one compiled stage serves M stacked runs of different
sizes (``gujax.arms.train_runs``), each with its own calibrated noise. The
closure holds only what an arm fixes for all of its runs (the GNQ budget,
cap and regulariser, the noise generator, whether there is a ledger).

The GNQ policies (``monitor_policy``, ``censor_policy``, ``clip_policy``)
keep a per-example disclosure ledger (``GnqState``); DP-SGD (``dpsgd_policy``)
keeps its noise key and, optionally, the same ledger charged on the clipped
gradients with the floor lam = sigma^2 C^2. Realised disclosure, the fixed
step floor and the fixed-point iterations are explained in docs/theory.md.

Realised disclosure. Every GNQ policy scales example j's gradient by a factor
c_j in [0, 1] (monitor: 1; censor: 0 or 1; clip: the clip factor) and
aggregates sum_j c_j g_j / n, n the number of real (unmasked) rows. The
disclosure charged to j is computed from the gradients the update really
contains, c_j g_j, against a floor lam fixed for the step from the batch as
sampled. Leaving an example out, or scaling it down, shrinks everybody else's
S_-j, which can only raise their GNQ, so censor and clip iterate until the
charge they account for is the charge they incur.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from gujax import checks
from gujax.noise import Noise, clip_factors
from gujax.uniqueness import disclosure, gnq_from_gram, regulariser

PyTree = Any

# Quantile levels of the per-example disclosure D reported by ``disclosure_quantiles``.
DISCLOSURE_QUANTILES = (0.5, 0.9, 0.99, 1.0)


class Ledger(NamedTuple):
    """The durable per-example disclosure record (leading axis ``num_examples``).

      cumulative_gnq: float32, sum of the realised GNQ over the steps that
        used the example.
      disclosure: float32, D_j = sum of d_j = 1/2 log(1 + GNQ_j), nats.
      steps_used: int32, steps whose update contained the example (weight > 0).
      times_scored: int32, steps in which the example was a real batch row
        (copies of one example in a batch count once).
      retired: bool, refused for good (``censor_policy(policy="retire")`` only).
      last_gnq: float32, GNQ of the example's gradient in the most recent step
        that scored it, against the whole batch before any refusal or clipping
        (NaN if never scored or its gradient was not finite).
      step: () int32, number of updates so far.
    """
    cumulative_gnq: jax.Array
    disclosure: jax.Array
    steps_used: jax.Array
    times_scored: jax.Array
    retired: jax.Array
    last_gnq: jax.Array
    step: jax.Array


class StepInfo(NamedTuple):
    """What the last step did (0-d arrays), the trainer's per-step metrics.

      num_scored: real (unmasked, valid-id) rows.
      num_refused: real rows given weight 0 (refused by the budget, a retired
        example, or a non-finite gradient).
      num_clipped: real rows given a weight factor strictly below 1.
      num_nonfinite: real rows whose gradient was NaN/Inf.
      num_bad_ids: rows whose id was outside [0, num_examples) (only possible
        under jit, where ids cannot be checked; they are treated as padding).
      max_step_disclosure: float32, largest realised d_j of the step (nats).
    """
    num_scored: jax.Array
    num_refused: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array
    num_bad_ids: jax.Array
    max_step_disclosure: jax.Array


class GnqState(collections.namedtuple("GnqState", Ledger._fields + StepInfo._fields)):
    """State of the GNQ policies: the ``Ledger`` fields, then the ``StepInfo``
    fields of the last step (``state.ledger`` and ``state.last`` give the two
    parts). The last step's info rides in the state because an optax
    ``update`` has no other way out; the trainer reports it as metrics
    (``step_metrics``) and only the ledger is meant to be kept."""
    __slots__ = ()

    @classmethod
    def of(cls, ledger: Ledger, last: StepInfo) -> "GnqState":
        return cls(*ledger, *last)

    @property
    def ledger(self) -> Ledger:
        return Ledger(*self[:len(Ledger._fields)])

    @property
    def last(self) -> StepInfo:
        return StepInfo(*self[len(Ledger._fields):])

    @property
    def disclosure_quantiles(self) -> jax.Array:
        """D at ``DISCLOSURE_QUANTILES`` over the examples scored at least once
        (NaN before any); computed on demand, not every step."""
        return disclosure_quantiles(self.ledger)

    def step_metrics(self) -> dict[str, jax.Array]:
        """The last step's scalars worth logging (name -> 0-d array)."""
        return {**self.last._asdict(), "num_retired": jnp.sum(self.retired)}


class DpsgdState(NamedTuple):
    """State of ``dpsgd_policy``: everything that differs between runs.

    key: the noise PRNG key (its implementation is ``Noise.impl``).
    noise_multiplier: () float32, sigma.
    l2_norm_clip: () float32, C (gradient L2 units).
    expected_batch_size: () float32, the update's denominator (q N under
      Poisson sampling, or the fixed batch size).
    gnq: the GNQ ledger on the clipped gradients (``GnqState``), or () for a
      policy without one.
    """
    key: jax.Array
    noise_multiplier: jax.Array
    l2_norm_clip: jax.Array
    expected_batch_size: jax.Array
    gnq: Any = ()

    @property
    def ledger(self) -> "Ledger | None":
        """The per-example disclosure ledger, or None without one."""
        return self.gnq.ledger if isinstance(self.gnq, GnqState) else None

    def step_metrics(self) -> dict[str, jax.Array]:
        """The ledger's per-step scalars (see ``GnqState.step_metrics``)."""
        return self.gnq.step_metrics() if isinstance(self.gnq, GnqState) else {}


class BatchStats(NamedTuple):
    """What a policy reads of a batch (from ``GradientPass.statistics``).

    sq_norms: (B,) ||g_j||^2 of the batch rows (NaN/Inf: a non-finite gradient).
    gram: (B + R, B + R) Gram matrix, batch rows first, or None when the
      policy reads no cross terms (``Policy.cross_terms`` False).
    materialised: what the engine kept to form the weighted sum (per-example
      gradients the Gram already materialised); policies ignore it.
    """
    sq_norms: jax.Array
    gram: jax.Array | None = None
    materialised: Any = ()


def batch_stats(gram, num_batch: int | None = None) -> BatchStats:
    """The ``BatchStats`` of a given (B + R, B + R) Gram matrix whose first
    ``num_batch`` = B rows are the batch (default: every row)."""
    gram = jnp.asarray(gram)
    return BatchStats(jnp.diagonal(gram)[:num_batch], gram)


class Policy(NamedTuple):
    """weights(stats, example_ids, mask, state) -> (weights (B,), state)
         stats: ``BatchStats``; example_ids: (B,) int; mask: (B,) bool or
           None, False marks a padding row.
    finish(weighted_sum, state) -> (update, state): the update from
      sum_j weights_j g_j (identity for the GNQ policies, noise for DP-SGD).
    init() -> state.
    cross_terms: whether ``stats.gram`` is read (False: only the norms).
    num_examples: the ledger's size (ids lie in [0, num_examples)), or None
      for a policy that keeps no per-example state (ids then optional).
    """
    init: Callable[[], Any]
    weights: Callable[..., tuple[jax.Array, Any]]
    finish: Callable[[PyTree, Any], tuple[PyTree, Any]]
    cross_terms: bool = True
    num_examples: int | None = None


def _unchanged(weighted_sum, state):
    return weighted_sum, state


def disclosure_quantiles(ledger: Ledger, levels=DISCLOSURE_QUANTILES) -> jax.Array:
    """Quantiles of D_j (nats) over the examples scored at least once."""
    seen = ledger.times_scored > 0
    return jnp.nanquantile(jnp.where(seen, ledger.disclosure, jnp.nan),
                           jnp.asarray(levels, jnp.float32))


def gnq_ledger(state) -> Ledger | None:
    """The per-example disclosure ledger inside a policy state (``GnqState``
    or ``DpsgdState``), or None for a state that keeps none."""
    return getattr(state, "ledger", None)


# ----------------------------------------------------------------------------
# The GNQ policies.

def _init_state(num_examples: int) -> GnqState:
    zeros_f = jnp.zeros((num_examples,), jnp.float32)
    zeros_i = jnp.zeros((num_examples,), jnp.int32)
    scalar_i = jnp.zeros((), jnp.int32)
    ledger = Ledger(cumulative_gnq=zeros_f, disclosure=zeros_f, steps_used=zeros_i,
                    times_scored=zeros_i, retired=jnp.zeros((num_examples,), bool),
                    last_gnq=jnp.full((num_examples,), jnp.nan, jnp.float32),
                    step=scalar_i)
    last = StepInfo(num_scored=scalar_i, num_refused=scalar_i, num_clipped=scalar_i,
                    num_nonfinite=scalar_i, num_bad_ids=scalar_i,
                    max_step_disclosure=jnp.zeros((), jnp.float32))
    return GnqState.of(ledger, last)


def _merge_copies(gram, first_row):
    """The Gram matrix of the merged rows: row j's gradient added to row
    ``first_row[j]`` (N,) (the first row of its example; itself for a unique
    example or a reference row). An example's contribution to a step is the
    sum of its rows, so copies of it in one batch are one contribution."""
    def merge(gram):
        rows = jnp.zeros_like(gram).at[first_row].add(gram)
        return jnp.zeros_like(gram).at[:, first_row].add(rows)

    # A batch without repeated ids (the usual one) merges to itself: skip the
    # two N x N scatters, which XLA:CPU runs as serial loops (0.6 ms at
    # N = 256, a seventh of the plain MLP step, per GNQ evaluation).
    unique = jnp.all(first_row == jnp.arange(first_row.shape[0]))
    return jax.lax.cond(unique, lambda g: g, merge, gram)


def _scaled_gnq(gram, factors, excluded, lam, first):
    """(B,) GNQ of each batch row's example's merged contribution
    sum_{rows k of the example} c_k g_k (c = ``factors`` for the B batch rows,
    1 for reference rows) against the fixed floor ``lam``, given to every row
    of the example. ``first`` (B,): each batch row's example's first row.
    Rows flagged in ``excluded`` (N,) are left out of every S_-j and score NaN."""
    n, b = gram.shape[0], first.shape[0]
    c = jnp.ones((n,), gram.dtype).at[:b].set(factors.astype(gram.dtype))
    first_row = jnp.arange(n).at[:b].set(first)
    merged = _merge_copies(gram * c[:, None] * c[None, :], first_row)
    # gnq_from_gram drops any row whose diagonal is not finite: the excluded
    # rows and the later rows of a merged example.
    out = excluded | (first_row != jnp.arange(n))
    merged = merged.at[jnp.arange(n), jnp.arange(n)].set(
        jnp.where(out, jnp.nan, jnp.diagonal(merged)))
    scores = gnq_from_gram(merged, reg=lam, relative=False, num_scored=b)
    return jnp.where(excluded[:b], jnp.nan, scores[first])


class _Step(NamedTuple):
    """A validated step, as every GNQ policy starts it.

    gram (N, N) floating; ids (B,) clipped into range; real (B,) rows that
    count; excluded (N,) rows left out of every S_-j; lam the step's floor;
    raw (B,) GNQ of the whole batch; bad_ids () count of out-of-range ids;
    first (B,) the first real row of each row's example (itself if unique
    or not real): the rows of one example are scored and charged as one.
    """
    gram: jax.Array
    ids: jax.Array
    real: jax.Array
    excluded: jax.Array
    lam: jax.Array
    raw: jax.Array
    bad_ids: jax.Array
    first: jax.Array

    def gnq(self, factors) -> jax.Array:
        """(B,) realised GNQ with per-row factors (``_scaled_gnq``)."""
        return _scaled_gnq(self.gram, factors, self.excluded, self.lam, self.first)

    @property
    def charged(self) -> jax.Array:
        """(B,) rows whose charge counts: one per example (its first row)."""
        return self.first == jnp.arange(self.first.shape[0])


def _prepare(stats: BatchStats, example_ids, mask, num_examples, reg, relative) -> _Step:
    if stats.gram is None:
        raise ValueError("a GNQ policy reads the Gram matrix: BatchStats.gram is None")
    gram = jnp.asarray(stats.gram)
    if jnp.ndim(example_ids) != 1:
        raise ValueError(f"example_ids must be a 1-D (B,) int array, got shape "
                         f"{jnp.shape(example_ids)}")
    b = jnp.shape(example_ids)[0]
    if b == 0:
        raise ValueError("empty batch (B = 0)")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < b:
        raise ValueError(f"gram must be square (B + R, B + R) with the B = {b} batch "
                         f"rows first, got shape {gram.shape}")
    if not jnp.issubdtype(gram.dtype, jnp.floating):
        gram = gram.astype(jnp.result_type(float))
    ids = checks.example_ids(example_ids, b, num_examples)
    mask = checks.mask(mask, b)
    good_id = (ids >= 0) & (ids < num_examples)
    real = mask & good_id
    n = gram.shape[0]
    excluded = jnp.zeros((n,), bool).at[:b].set(~real)
    same = (ids[:, None] == ids[None, :]) & real[:, None] & real[None, :]
    first = jnp.where(real, jnp.argmax(same, axis=1), jnp.arange(b))
    # lam is fixed for the step from the batch as sampled (real, finite rows
    # and reference rows), so that refusing or down-weighting a row lowers its
    # signal against a fixed floor; recomputing a relative lam from the scaled
    # rows would make a common down-scaling of every row a no-op.
    # lam is computed on the merged contributions (one row per example).
    first_row = jnp.arange(n).at[:b].set(first)
    merged = _merge_copies(jnp.where(jnp.isfinite(gram), gram, jnp.nan), first_row)
    valid = ~excluded & (first_row == jnp.arange(n)) & jnp.isfinite(jnp.diagonal(merged))
    valid = valid & jnp.all(jnp.isfinite(merged) | ~valid[None, :], axis=1)
    clean = jnp.where(valid[:, None] & valid[None, :], merged, 0)
    lam = regulariser(clean, reg, relative=relative, valid=valid)
    lam = jnp.where(lam > 0, lam, jnp.ones_like(lam))  # all-zero batch: any lam
    raw = _scaled_gnq(gram, jnp.ones((b,)), excluded, lam, first)
    bad_ids = jnp.sum(mask & ~good_id).astype(jnp.int32)
    # Out-of-range ids index a valid slot (clipped) but carry zero weight.
    safe_ids = jnp.clip(ids, 0, num_examples - 1)
    return _Step(gram, safe_ids, real, excluded, lam, raw, bad_ids, first)


def _once_per_example(rows: jax.Array, ids: jax.Array, num_examples: int) -> jax.Array:
    """(num_examples,) int32: 1 where some row of the example is True. Copies
    of one example in a batch count once, so counters count steps, not rows."""
    return jnp.zeros((num_examples,), jnp.int32).at[ids].max(rows.astype(jnp.int32))


def _record(state: GnqState, step: _Step, factors, realised_gnq, retire_rows) -> GnqState:
    """The ledger after a step with per-row weight factors c (B,)."""
    ledger, ids, real, raw = state.ledger, step.ids, step.real, step.raw
    n = ledger.disclosure.shape[0]
    used = real & (factors > 0)
    # One charge per example: its merged contribution's, on its first row.
    realised = jnp.where(used & step.charged, realised_gnq, 0).astype(jnp.float32)
    d = jnp.where(used & step.charged, disclosure(realised), 0).astype(jnp.float32)
    # A row that is not real must not overwrite the slot its (clipped) id hits.
    last_gnq = ledger.last_gnq.at[jnp.where(real, ids, n)].set(
        raw.astype(jnp.float32), mode="drop")
    new_ledger = Ledger(
        cumulative_gnq=ledger.cumulative_gnq.at[ids].add(realised),
        disclosure=ledger.disclosure.at[ids].add(d),
        steps_used=ledger.steps_used + _once_per_example(used, ids, n),
        times_scored=ledger.times_scored + _once_per_example(real, ids, n),
        retired=ledger.retired | (_once_per_example(retire_rows & real, ids, n) > 0),
        last_gnq=last_gnq,
        step=ledger.step + 1)
    info = StepInfo(
        num_scored=jnp.sum(real).astype(jnp.int32),
        num_refused=jnp.sum(real & (factors <= 0)).astype(jnp.int32),
        num_clipped=jnp.sum(real & (factors < 1)).astype(jnp.int32),
        num_nonfinite=jnp.sum(real & ~jnp.isfinite(raw)).astype(jnp.int32),
        num_bad_ids=step.bad_ids,
        max_step_disclosure=jnp.max(d))
    return GnqState.of(new_ledger, info)


def _mean_weights(factors, real):
    """Aggregation weights c_j / n with n the number of real rows (fixed: a
    refused or clipped example never enlarges the others' share)."""
    n = jnp.maximum(jnp.sum(real), 1)
    return jnp.where(real, factors, 0) / n


def _gnq_policy(weights, num_examples: int) -> Policy:
    return Policy(lambda: _init_state(num_examples), weights, _unchanged,
                  cross_terms=True, num_examples=num_examples)


def _common(num_examples, reg) -> tuple[int, float]:
    return (checks.positive_int(num_examples, "num_examples"),
            checks.positive_finite(reg, "reg"))


def monitor_policy(*, num_examples: int, reg, relative: bool = True) -> Policy:
    """Weights 1/n for every real row (the plain mean gradient); the ledger
    accumulates each example's GNQ and disclosure."""
    num_examples, reg = _common(num_examples, reg)

    def weights(stats, example_ids, mask, state):
        step = _prepare(stats, example_ids, mask, num_examples, reg, relative)
        factors = jnp.where(jnp.isfinite(step.raw), 1.0, 0.0)
        # Non-finite rows are already outside everyone's S_-j, so the realised
        # scores are the raw ones.
        new_state = _record(state, step, factors, step.raw, jnp.zeros_like(step.real))
        return _mean_weights(factors, step.real), new_state

    return _gnq_policy(weights, num_examples)


def censor_policy(*, budget, num_examples: int, reg, relative: bool = True,
                  policy: str = "retire") -> Policy:
    """Admit j iff it is not retired and D_j + d_j <= budget (docs/theory.md).

    d_j is the realised disclosure: the GNQ of j among the *admitted* rows
    (plus reference rows), not among the whole batch. Starting from every
    eligible row, rows that would overrun their budget are refused and the
    scores of the remaining rows recomputed, until no admitted row overruns
    (at most B rounds: the admitted set only shrinks). The first round is
    exactly the rule as stated on the whole batch; later rounds only refuse
    more. Copies of one example in a batch are one contribution (the sum of
    its rows), scored and charged once: D_j plus that contribution's d must
    fit, and its rows are admitted or refused together.

    policy: "retire" (a refused example is never used again) or "skip" (it is
      only left out of this step).
    """
    budget = checks.budget(budget)
    num_examples, reg = _common(num_examples, reg)
    if policy not in ("retire", "skip"):
        raise ValueError(f"policy must be 'retire' or 'skip', got {policy!r}")

    def weights(stats, example_ids, mask, state):
        step = _prepare(stats, example_ids, mask, num_examples, reg, relative)
        ids, b = step.ids, step.ids.shape[0]
        eligible = step.real & jnp.isfinite(step.raw) & ~state.ledger.retired[ids]

        def charge(admitted):
            gnq_admitted = step.gnq(admitted.astype(step.gram.dtype))
            d = jnp.where(admitted, disclosure(gnq_admitted), 0).astype(jnp.float32)
            # Copies of an example are one merged contribution, charged once.
            return gnq_admitted, state.ledger.disclosure[ids] + d

        def round_(carry):
            admitted, _, _ = carry
            gnq_admitted, total = charge(admitted)
            # NaN (never for admitted rows) would compare False: refuse it.
            keep = admitted & (total <= budget)
            return keep, jnp.any(keep != admitted), gnq_admitted

        admitted, _, gnq_admitted = jax.lax.while_loop(
            lambda carry: carry[1], round_, (eligible, jnp.array(True), step.raw))
        factors = admitted.astype(jnp.float32)
        refused_by_budget = step.real & jnp.isfinite(step.raw) & ~admitted
        retire_rows = refused_by_budget if policy == "retire" else jnp.zeros((b,), bool)
        new_state = _record(state, step, factors, gnq_admitted, retire_rows)
        return _mean_weights(factors, step.real), new_state

    return _gnq_policy(weights, num_examples)


# Rescaling aims this far below the cap so that the realised score, which the
# rescaling of other rows pushes up again, settles under it in few rounds.
_CLIP_TARGET = 1 - 1e-3
# A realised score this close to the cap counts as within it (float32 rounding
# of the Cholesky solve is ~1e-6 relative at moderate reg).
_CLIP_TOLERANCE = 1 - 1e-4


def clip_policy(*, max_step, num_examples: int, reg, relative: bool = True,
                max_rounds: int = 20) -> Policy:
    """Scale g_j by c_j in [0, 1] so that every realised d_j <= the cap.

    With s_max = exp(2 * max_step) - 1 (``max_step`` in nats), one rescaling
    c_j = min(1, sqrt(s_max / GNQ_j)) is not enough: shrinking the other rows
    shrinks S_-j, so the realised GNQ'_j = c_j^2 g_j^T S'_-j^-1 g_j can exceed
    c_j^2 GNQ_j. The policy therefore repeats
    c_j <- c_j * min(1, sqrt(0.999 s_max / GNQ'_j)) on the realised scores (c
    only decreases). Rows still over the cap after ``max_rounds`` rounds are
    set to zero, one round at a time, until none is over; zero rows disclose
    nothing, so this ends within B more rounds and the cap then holds for
    every row (up to float rounding, 1e-4 relative).

    lam stays at the step's value for the batch as sampled, so the cap is in
    units of that floor.
    """
    cap = checks.positive_finite(max_step, "max_step")
    num_examples, reg = _common(num_examples, reg)
    max_rounds = checks.positive_int(max_rounds, "max_rounds")
    s_max = math.expm1(2 * cap)

    def weights(stats, example_ids, mask, state):
        step = _prepare(stats, example_ids, mask, num_examples, reg, relative)
        b = step.ids.shape[0]
        start = jnp.where(step.real & jnp.isfinite(step.raw), 1.0, 0.0).astype(step.gram.dtype)

        def realised(c):
            return jnp.where(c > 0, step.gnq(c), 0)

        def over(score):
            return score > s_max * _CLIP_TOLERANCE

        def round_(carry):
            c, score, rounds = carry
            shrink = jnp.sqrt(s_max * _CLIP_TARGET / jnp.maximum(score, 1e-30))
            rescaled = jnp.where(over(score), c * shrink, c)
            zeroed = jnp.where(over(score), 0.0, c)
            # One factor per example: its rows are one merged contribution.
            c = jnp.where(rounds < max_rounds, rescaled, zeroed)[step.first]
            return c, realised(c), rounds + 1

        c, score, _ = jax.lax.while_loop(
            lambda carry: jnp.any(over(carry[1])), round_,
            (start, realised(start), jnp.array(0)))
        factors = c.astype(jnp.float32)
        new_state = _record(state, step, factors, score, jnp.zeros((b,), bool))
        return _mean_weights(factors, step.real), new_state

    return _gnq_policy(weights, num_examples)


def mean_policy() -> Policy:
    """Plain SGD's mean gradient over the real rows, with no state; a row whose
    gradient is not finite is left out (the denominator still counts it)."""
    def weights(stats, example_ids, mask, state):
        diag = stats.sq_norms
        real = checks.mask(mask, diag.shape[0])
        return _mean_weights(jnp.isfinite(diag).astype(jnp.float32), real), state
    return Policy(lambda: (), weights, _unchanged, cross_terms=False)


# ----------------------------------------------------------------------------
# DP-SGD.

def _charge_clipped(gram, c, finite, example_ids, mask, state: DpsgdState) -> GnqState:
    """The ledger on the clipped gradients with lam = sigma^2 C^2, computed as
    GNQ of K c c^T / (sigma C)^2 with lam = 1 (GNQ is invariant to scaling K
    and lam together)."""
    b = gram.shape[0]
    floor = jnp.square(state.noise_multiplier * state.l2_norm_clip).astype(gram.dtype)
    scaled = gram * (c[:, None] * c[None, :]).astype(gram.dtype) / floor
    # A non-finite row gets a NaN diagonal: the monitor leaves it out of
    # every S_-j, as it is left out of the sum.
    scaled = scaled.at[jnp.arange(b), jnp.arange(b)].set(
        jnp.where(finite, jnp.diagonal(scaled), jnp.nan))
    monitor = monitor_policy(num_examples=state.gnq.disclosure.shape[0], reg=1.0,
                             relative=False)
    _, ledger = monitor.weights(batch_stats(scaled), example_ids, mask, state.gnq)
    return ledger


def dpsgd_policy(*, l2_norm_clip, expected_batch_size, noise_multiplier, seed: int = 0,
                 num_examples: int | None = None, noise: Noise = Noise()) -> Policy:
    """DP-SGD: per-example L2 clipping to C, Gaussian noise N(0, sigma^2 C^2 I)
    on the clipped sum, division by the expected batch size.

    weights: the clip factors min(1, C / ||g_j||) from the squared norms, 0
    for padding and non-finite rows. finish: (sum + noise) / expected_batch_size,
    the noise drawn by ``noise`` (``gujax.noise.Noise``).

    sigma, C, the expected batch size and the noise key are the run's: they
    live in the state (``DpsgdState``), which ``init`` fills from these
    arguments; ``weights`` and ``finish`` read them from the state alone, so
    one stage serves runs with different constants (module docstring).

    With ``num_examples`` the GNQ ledger is charged on the clipped gradients
    with the floor lam = sigma^2 C^2 (docs/theory.md; the policy then reads
    the Gram matrix); since ||clip(g_j)|| <= C one step then discloses at
    most 1/2 log(1 + 1/sigma^2) nats about any example. Without it only the
    squared norms are read.

    Args:
      l2_norm_clip: C > 0 (gradient L2 units). expected_batch_size: q N under
        Poisson sampling, or the fixed batch size (> 0). noise_multiplier:
        sigma (> 0 with a ledger, which needs a floor; else >= 0).
      seed: seeds the noise key kept in the state.
      num_examples: size of the ledger, or None for no ledger.
      noise: the generator (key implementation and draw schedule): another
        choice gives another stream for the same seed, the same distribution.
    """
    if not isinstance(noise, Noise):
        raise ValueError(f"noise must be a gujax.noise.Noise, got {noise!r}")
    l2_norm_clip = checks.positive_finite(l2_norm_clip, "l2_norm_clip")
    expected_batch_size = checks.positive_finite(expected_batch_size, "expected_batch_size")
    with_ledger = num_examples is not None
    noise_multiplier = checks.positive_finite(
        noise_multiplier, "noise_multiplier", allow_zero=not with_ledger,
        context=" (the ledger's floor is sigma^2 C^2)" if with_ledger else "")
    seed = checks.seed(seed)
    if with_ledger:
        num_examples = checks.positive_int(num_examples, "num_examples")

    def init():
        return DpsgdState(noise.key(seed), *(jnp.asarray(v, jnp.float32) for v in (
            noise_multiplier, l2_norm_clip, expected_batch_size)),
            gnq=_init_state(num_examples) if with_ledger else ())

    def weights(stats, example_ids, mask, state):
        sq = stats.sq_norms
        mask = checks.mask(mask, sq.shape[0])
        # A NaN/Inf anywhere in g_j shows on its squared norm.
        finite = jnp.isfinite(sq)
        keep = finite & mask
        c = clip_factors(sq, state.l2_norm_clip, keep)
        if with_ledger:
            gram = stats.gram[:sq.shape[0], :sq.shape[0]]
            clean = jnp.where(keep[:, None] & keep[None, :], gram, 0)
            state = state._replace(gnq=_charge_clipped(clean, c, finite, example_ids, mask,
                                                       state))
        return c, state

    def finish(clipped_sum, state):
        z, key = noise.draw(state.key, clipped_sum, state.noise_multiplier * state.l2_norm_clip)
        update = jax.tree_util.tree_map(lambda g, n: (g + n) / state.expected_batch_size,
                                        clipped_sum, z)
        return update, state._replace(key=key)

    return Policy(init, weights, finish, cross_terms=with_ledger, num_examples=num_examples)
