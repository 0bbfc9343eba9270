"""GNQ training transformations: monitor, censor and clip per-example gradients.

Each transformation is an ``optax.GradientTransformationExtraArgs`` whose
``update`` takes per-example gradients (a pytree whose leaves carry a leading
batch axis B) and the keyword ``example_ids`` (B,), and returns the aggregated
update (no batch axis), so it heads an ``optax.chain``:

    tx = optax.chain(gnq_censor(budget=2.0, num_examples=n, reg=1e-2),
                     optax.adam(1e-3))
    updates, opt_state = tx.update(grads, opt_state, params, example_ids=ids)

Each one is split in two so that other gradient engines (the "ghost" path,
which never materialises per-example gradients) can reuse the decision:

  (a) a pure *policy*, ``weights, new_state = policy.weights(gram, example_ids,
      mask, state)``, that sees only the (B + R, B + R) Gram matrix of the batch
      (plus R reference rows) and returns per-example aggregation weights (B,);
  (b) the explicit aggregation ``sum_j weights_j g_j``.

Realised disclosure. Every policy scales example j's gradient by a factor
c_j in [0, 1] (monitor: 1; censor: 0 or 1; clip: the clip factor) and
aggregates sum_j c_j g_j / n, where n is the number of real (unmasked) rows.
The disclosure charged to j is computed from the gradients the update really
contains, c_j g_j: GNQ'_j = c_j^2 g_j^T (sum_{k != j} c_k^2 g_k g_k^T + R_ref
+ lam I)^-1 g_j, where R_ref is the reference rows' second moment and lam is
fixed for the step from the batch as sampled (``reg`` itself, or with
``relative=True`` reg * trace(K) / N over the real, finite batch rows and the
reference rows). Leaving an example out, or scaling it down, shrinks
everybody else's S_-j, which can only raise their GNQ, so censor and clip
iterate until the charge they account for is the charge they incur (see
``censor_policy`` and ``clip_policy``). Monitor charges the raw GNQ.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gujax.gnq import disclosure, gnq_from_gram, regulariser
from gujax.grads import batch_size, finite_rows, gram as gram_matrix

PyTree = Any

# Quantile levels of the per-example disclosure D reported in the state.
DISCLOSURE_QUANTILES = (0.5, 0.9, 0.99, 1.0)


class GnqState(NamedTuple):
    """Per-example disclosure ledger shared by the three GNQ policies.

    Per training example (leading axis ``num_examples``):
      cumulative_gnq: float32, sum of the realised GNQ over the steps that
        used the example.
      disclosure: float32, D_j = sum of d_j = 1/2 log(1 + GNQ_j), nats.
      steps_used: int32, steps whose update contained the example (weight > 0).
      times_scored: int32, steps in which the example was a real batch row.
      retired: bool, refused for good (``gnq_censor(policy="retire")`` only).
      last_gnq: float32, GNQ of the example's gradient in the most recent step
        that scored it, against the whole batch before any refusal or clipping
        (NaN if never scored or its gradient was not finite).
    Of the last step (scalars unless stated):
      step: int32, number of updates so far.
      num_scored: int32, real (unmasked, valid-id) rows.
      num_refused: int32, real rows given weight 0 (refused by the budget, a
        retired example, or a non-finite gradient).
      num_clipped: int32, real rows given a weight factor strictly below 1.
      num_nonfinite: int32, real rows whose gradient was NaN/Inf.
      num_bad_ids: int32, rows whose id was outside [0, num_examples) (only
        possible under jit, where ids cannot be checked; those rows are
        treated as padding).
      max_step_disclosure: float32, largest realised d_j of the step (nats).
      disclosure_quantiles: (len(DISCLOSURE_QUANTILES),) float32, quantiles
        of D over the examples scored at least once (NaN before any).
    """
    cumulative_gnq: jax.Array
    disclosure: jax.Array
    steps_used: jax.Array
    times_scored: jax.Array
    retired: jax.Array
    last_gnq: jax.Array
    step: jax.Array
    num_scored: jax.Array
    num_refused: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array
    num_bad_ids: jax.Array
    max_step_disclosure: jax.Array
    disclosure_quantiles: jax.Array

    def step_metrics(self) -> dict[str, jax.Array]:
        """The scalars worth logging after each step (name -> 0-d array)."""
        metrics = {name: getattr(self, name) for name in (
            "num_scored", "num_refused", "num_clipped", "num_nonfinite",
            "num_bad_ids", "max_step_disclosure")}
        metrics["num_retired"] = jnp.sum(self.retired)
        for level, value in zip(DISCLOSURE_QUANTILES, self.disclosure_quantiles):
            metrics[f"disclosure_q{level:g}"] = value
        return metrics


class GnqPolicy(NamedTuple):
    """A Gram-matrix policy: the decision half of a GNQ transformation.

    init() -> GnqState
    weights(gram, example_ids, mask, state) -> (weights, new_state)
      gram: (B + R, B + R) Gram matrix of the B batch rows followed by R
        reference rows (NaN/Inf entries mark a non-finite gradient).
      example_ids: (B,) int, training-set index of each batch row.
      mask: (B,) bool or None; False marks a padding row.
      weights: (B,) float, the update is sum_j weights_j g_j. Zero for padding,
        refused and non-finite rows.
    """
    init: Callable[[], GnqState]
    weights: Callable[..., tuple[jax.Array, GnqState]]


# ----------------------------------------------------------------------------
# Argument checks (static, before any compute).

def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_positive_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_budget(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or math.isnan(value) or value < 0:
        raise ValueError(f"budget must be a number >= 0 (nats; inf allowed), got {value!r}")
    return float(value)


def check_example_ids(example_ids, num_rows: int, num_examples: int) -> jax.Array:
    """Shape/dtype check at trace time; range check when the ids are concrete.

    Under ``jax.jit`` the values are tracers and cannot be checked; the
    policies then treat an out-of-range row as padding and count it in
    ``GnqState.num_bad_ids``.
    """
    if example_ids is None:
        raise ValueError("example_ids is required: (B,) int training-set indices")
    ids = jnp.asarray(example_ids)
    if ids.shape != (num_rows,):
        raise ValueError(f"example_ids must have shape ({num_rows},) (one per batch "
                         f"row), got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"example_ids must be integers, got dtype {ids.dtype}")
    if not isinstance(example_ids, jax.core.Tracer):
        values = np.asarray(example_ids)
        bad = (values < 0) | (values >= num_examples)
        if bad.any():
            raise ValueError(
                f"example_ids must lie in [0, {num_examples}); got "
                f"{values[bad][:5].tolist()} at rows {np.flatnonzero(bad)[:5].tolist()}")
    return ids


def _check_mask(mask, num_rows: int) -> jax.Array:
    if mask is None:
        return jnp.ones((num_rows,), bool)
    mask = jnp.asarray(mask)
    if mask.shape != (num_rows,) or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a ({num_rows},) bool array, got "
                         f"{mask.dtype} {mask.shape}")
    return mask


# ----------------------------------------------------------------------------
# The Gram-matrix policies.

def _init_state(num_examples: int) -> GnqState:
    zeros_f = jnp.zeros((num_examples,), jnp.float32)
    zeros_i = jnp.zeros((num_examples,), jnp.int32)
    scalar_i = jnp.zeros((), jnp.int32)
    return GnqState(
        cumulative_gnq=zeros_f, disclosure=zeros_f, steps_used=zeros_i,
        times_scored=zeros_i, retired=jnp.zeros((num_examples,), bool),
        last_gnq=jnp.full((num_examples,), jnp.nan, jnp.float32),
        step=scalar_i, num_scored=scalar_i, num_refused=scalar_i,
        num_clipped=scalar_i, num_nonfinite=scalar_i, num_bad_ids=scalar_i,
        max_step_disclosure=jnp.zeros((), jnp.float32),
        disclosure_quantiles=jnp.full((len(DISCLOSURE_QUANTILES),), jnp.nan, jnp.float32))


def _scaled_gnq(gram, factors, excluded, lam, num_scored):
    """GNQ of the scaled gradients c_j g_j (c = ``factors`` for the B scored
    rows, 1 for reference rows) against the fixed floor ``lam``; rows flagged
    in ``excluded`` (N,) are left out of every S_-j and score NaN."""
    n = gram.shape[0]
    c = jnp.ones((n,), gram.dtype).at[:num_scored].set(factors.astype(gram.dtype))
    scaled = gram * c[:, None] * c[None, :]
    # gnq_from_gram drops any row whose diagonal is not finite.
    scaled = scaled.at[jnp.arange(n), jnp.arange(n)].set(
        jnp.where(excluded, jnp.nan, jnp.diagonal(scaled)))
    return gnq_from_gram(scaled, reg=lam, relative=False, num_scored=num_scored)


def _prepare(gram, example_ids, mask, num_examples, reg, relative):
    """Validate shapes; return (ids clipped into range, real rows (B,), rows
    excluded from every S_-j (B + R,), the step's lam, the raw GNQ (B,) of the
    whole batch, count of out-of-range ids)."""
    gram = jnp.asarray(gram)
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
    ids = check_example_ids(example_ids, b, num_examples)
    mask = _check_mask(mask, b)
    good_id = (ids >= 0) & (ids < num_examples)
    real = mask & good_id
    n = gram.shape[0]
    excluded = jnp.zeros((n,), bool).at[:b].set(~real)
    # lam is fixed for the step from the batch as sampled (real, finite rows
    # and reference rows), so that refusing or down-weighting a row lowers its
    # signal against a fixed floor; recomputing a relative lam from the scaled
    # rows would make a common down-scaling of every row a no-op.
    valid = ~excluded & jnp.isfinite(jnp.diagonal(gram))
    valid = valid & jnp.all(jnp.isfinite(gram) | ~valid[None, :], axis=1)
    clean = jnp.where(valid[:, None] & valid[None, :], gram, 0)
    lam = regulariser(clean, reg, relative=relative, valid=valid)
    lam = jnp.where(lam > 0, lam, jnp.ones_like(lam))  # all-zero batch: any lam
    raw = _scaled_gnq(gram, jnp.ones((b,)), excluded, lam, b)
    bad_ids = jnp.sum(mask & ~good_id).astype(jnp.int32)
    # Out-of-range ids index a valid slot (clipped) but carry zero weight.
    safe_ids = jnp.clip(ids, 0, num_examples - 1)
    return gram, safe_ids, real, excluded, lam, raw, bad_ids


def _record(state, ids, real, raw_gnq, factors, realised_gnq, bad_ids, retire_rows):
    """Update the ledger after a step with per-row weight factors c (B,)."""
    used = real & (factors > 0)
    realised = jnp.where(used, realised_gnq, 0).astype(jnp.float32)
    d = jnp.where(used, disclosure(realised), 0).astype(jnp.float32)
    finite = jnp.isfinite(raw_gnq)
    times_scored = state.times_scored.at[ids].add(real.astype(jnp.int32))
    disclosure_total = state.disclosure.at[ids].add(d)
    seen = times_scored > 0
    quantiles = jnp.nanquantile(jnp.where(seen, disclosure_total, jnp.nan),
                                jnp.asarray(DISCLOSURE_QUANTILES, jnp.float32))
    # A row that is not real must not overwrite the slot its (clipped) id hits.
    last_gnq = state.last_gnq.at[jnp.where(real, ids, state.last_gnq.shape[0])].set(
        raw_gnq.astype(jnp.float32), mode="drop")
    return GnqState(
        cumulative_gnq=state.cumulative_gnq.at[ids].add(realised),
        disclosure=disclosure_total,
        steps_used=state.steps_used.at[ids].add(used.astype(jnp.int32)),
        times_scored=times_scored,
        # Integer scatter-add so that copies of one example in the batch OR
        # together (a scatter-set of bools would keep an arbitrary copy).
        retired=state.retired | (jnp.zeros(state.retired.shape, jnp.int32).at[ids].add(
            (retire_rows & real).astype(jnp.int32)) > 0),
        last_gnq=last_gnq,
        step=state.step + 1,
        num_scored=jnp.sum(real).astype(jnp.int32),
        num_refused=jnp.sum(real & (factors <= 0)).astype(jnp.int32),
        num_clipped=jnp.sum(real & (factors < 1)).astype(jnp.int32),
        num_nonfinite=jnp.sum(real & ~finite).astype(jnp.int32),
        num_bad_ids=bad_ids,
        max_step_disclosure=jnp.max(d),
        disclosure_quantiles=quantiles.astype(jnp.float32))


def _weights(factors, real):
    """Aggregation weights c_j / n with n the number of real rows (fixed: a
    refused or clipped example never enlarges the others' share)."""
    n = jnp.maximum(jnp.sum(real), 1)
    return jnp.where(real, factors, 0) / n


def monitor_policy(*, num_examples: int, reg, relative: bool = True) -> GnqPolicy:
    """Weights 1/n for every real row (the plain mean gradient); the ledger
    accumulates each example's GNQ and disclosure."""
    num_examples = _check_positive_int(num_examples, "num_examples")
    reg = _check_positive_finite(reg, "reg")

    def weights(gram, example_ids, mask, state):
        gram, ids, real, excluded, lam, raw, bad_ids = _prepare(
            gram, example_ids, mask, num_examples, reg, relative)
        b = ids.shape[0]
        factors = jnp.where(jnp.isfinite(raw), 1.0, 0.0)
        # Non-finite rows are already outside everyone's S_-j, so the realised
        # scores are the raw ones.
        new_state = _record(state, ids, real, raw, factors, raw, bad_ids,
                            jnp.zeros((b,), bool))
        return _weights(factors, real), new_state

    return GnqPolicy(lambda: _init_state(num_examples), weights)


def censor_policy(*, budget, num_examples: int, reg, relative: bool = True,
                  policy: str = "retire") -> GnqPolicy:
    """Admit j iff it is not retired and D_j + d_j <= budget (DESIGN section 2).

    d_j is the realised disclosure: the GNQ of j among the *admitted* rows
    (plus reference rows), not among the whole batch. Starting from every
    eligible row, rows that would overrun their budget are refused and the
    scores of the remaining rows recomputed, until no admitted row overruns
    (at most B rounds: the admitted set only shrinks). The first round is
    exactly the rule as stated on the whole batch; later rounds only refuse
    more. Copies of one example in a batch are charged together: D_j plus the
    sum of the copies' d must fit.

    policy: "retire" (a refused example is never used again) or "skip" (it is
      only left out of this step).
    """
    budget = _check_budget(budget)
    num_examples = _check_positive_int(num_examples, "num_examples")
    reg = _check_positive_finite(reg, "reg")
    if policy not in ("retire", "skip"):
        raise ValueError(f"policy must be 'retire' or 'skip', got {policy!r}")

    def weights(gram, example_ids, mask, state):
        gram, ids, real, excluded, lam, raw, bad_ids = _prepare(
            gram, example_ids, mask, num_examples, reg, relative)
        b = ids.shape[0]
        eligible = real & jnp.isfinite(raw) & ~state.retired[ids]

        def charge(admitted):
            gnq_admitted = _scaled_gnq(gram, admitted.astype(gram.dtype), excluded, lam, b)
            d = jnp.where(admitted, disclosure(gnq_admitted), 0).astype(jnp.float32)
            # Sum over copies of the same example in the batch.
            per_example = jnp.zeros((num_examples,), jnp.float32).at[ids].add(d)
            total = state.disclosure[ids] + per_example[ids]
            return gnq_admitted, total

        def not_done(carry):
            _, changed, _ = carry
            return changed

        def round_(carry):
            admitted, _, _ = carry
            gnq_admitted, total = charge(admitted)
            # NaN (never for admitted rows) would compare False: refuse it.
            keep = admitted & (total <= budget)
            return keep, jnp.any(keep != admitted), gnq_admitted

        admitted, _, gnq_admitted = jax.lax.while_loop(
            not_done, round_, (eligible, jnp.array(True), raw))
        factors = admitted.astype(jnp.float32)
        refused_by_budget = real & jnp.isfinite(raw) & ~admitted
        retire_rows = refused_by_budget if policy == "retire" else jnp.zeros((b,), bool)
        new_state = _record(state, ids, real, raw, factors, gnq_admitted, bad_ids,
                            retire_rows)
        return _weights(factors, real), new_state

    return GnqPolicy(lambda: _init_state(num_examples), weights)


# Rescaling aims this far below the cap so that the realised score, which the
# rescaling of other rows pushes up again, settles under it in few rounds.
_CLIP_TARGET = 1 - 1e-3
# A realised score this close to the cap counts as within it (float32 rounding
# of the Cholesky solve is ~1e-6 relative at moderate reg).
_CLIP_TOLERANCE = 1 - 1e-4


def clip_policy(*, max_step_disclosure, num_examples: int, reg, relative: bool = True,
                max_rounds: int = 20) -> GnqPolicy:
    """Scale g_j by c_j in [0, 1] so that every realised d_j <= the cap.

    With s_max = exp(2 * max_step_disclosure) - 1, one rescaling
    c_j = min(1, sqrt(s_max / GNQ_j)) is not enough: shrinking the other rows
    shrinks S_-j (and, with ``relative=True``, lam), so the realised
    GNQ'_j = c_j^2 g_j^T S'_-j^-1 g_j can exceed c_j^2 GNQ_j. The policy
    therefore repeats c_j <- c_j * min(1, sqrt(0.999 s_max / GNQ'_j)) on the
    realised scores (c only decreases). Rows still over the cap after
    ``max_rounds`` rounds are set to zero, one round at a time, until none is
    over; zero rows disclose nothing, so this ends within B more rounds and
    the cap then holds for every row (up to float rounding, 1e-4 relative).

    lam stays at the step's value for the batch as sampled (see the module
    docstring), so the cap is in units of that floor.
    """
    cap = _check_positive_finite(max_step_disclosure, "max_step_disclosure")
    num_examples = _check_positive_int(num_examples, "num_examples")
    reg = _check_positive_finite(reg, "reg")
    max_rounds = _check_positive_int(max_rounds, "max_rounds")
    s_max = math.expm1(2 * cap)

    def weights(gram, example_ids, mask, state):
        gram, ids, real, excluded, lam, raw, bad_ids = _prepare(
            gram, example_ids, mask, num_examples, reg, relative)
        b = ids.shape[0]
        start = jnp.where(real & jnp.isfinite(raw), 1.0, 0.0).astype(gram.dtype)

        def realised(c):
            return jnp.where(c > 0, _scaled_gnq(gram, c, excluded, lam, b), 0)

        def over(score):
            return score > s_max * _CLIP_TOLERANCE

        def not_done(carry):
            _, score, _ = carry
            return jnp.any(over(score))

        def round_(carry):
            c, score, rounds = carry
            shrink = jnp.sqrt(s_max * _CLIP_TARGET / jnp.maximum(score, 1e-30))
            rescaled = jnp.where(over(score), c * shrink, c)
            zeroed = jnp.where(over(score), 0.0, c)
            c = jnp.where(rounds < max_rounds, rescaled, zeroed)
            return c, realised(c), rounds + 1

        c, score, _ = jax.lax.while_loop(
            not_done, round_, (start, realised(start), jnp.array(0)))
        factors = c.astype(jnp.float32)
        new_state = _record(state, ids, real, raw, factors, score, bad_ids,
                            jnp.zeros((b,), bool))
        return _weights(factors, real), new_state

    return GnqPolicy(lambda: _init_state(num_examples), weights)


# ----------------------------------------------------------------------------
# The explicit aggregation and the optax transformations.

def aggregate(per_example: PyTree, weights: jax.Array) -> PyTree:
    """sum_j weights_j g_j over the leading axis; rows with weight 0 are
    skipped exactly (0 * NaN would otherwise poison the sum)."""
    def leaf_sum(g):
        keep = (weights != 0).reshape((-1,) + (1,) * (g.ndim - 1))
        g = jnp.where(keep, g, 0)
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1)
    return jax.tree_util.tree_map(leaf_sum, per_example)


def _with_reference(per_example: PyTree, reference_grads: PyTree | None) -> PyTree:
    if reference_grads is None:
        return per_example
    if jax.tree_util.tree_structure(reference_grads) != jax.tree_util.tree_structure(per_example):
        raise ValueError("reference_grads must have the same pytree structure as the "
                         "per-example gradients")
    batch_size(reference_grads, name="reference_grads")
    for g, r in zip(jax.tree_util.tree_leaves(per_example),
                    jax.tree_util.tree_leaves(reference_grads)):
        if jnp.shape(g)[1:] != jnp.shape(r)[1:]:
            raise ValueError(f"reference_grads leaf shape {jnp.shape(r)} does not match "
                             f"per-example leaf shape {jnp.shape(g)} beyond the leading axis")
    return jax.tree_util.tree_map(lambda g, r: jnp.concatenate([g, r.astype(g.dtype)]),
                                  per_example, reference_grads)


def policy_transformation(policy: GnqPolicy, *, dtype: Any = None
                          ) -> optax.GradientTransformationExtraArgs:
    """Wrap a Gram-matrix policy as an optax transformation on per-example
    gradients.

    update(per_example_grads, state, params=None, *, example_ids, mask=None,
           reference_grads=None, gram=None, **ignored)
      per_example_grads: pytree, leaves (B, *param.shape).
      example_ids: (B,) int in [0, num_examples).
      mask: (B,) bool, False = padding row (not scored, not aggregated, not in
        anyone's S_-j, no ledger change).
      reference_grads: pytree, leaves (R, *param.shape); they enter every S_-j
        but are neither scored nor aggregated.
      gram: optional precomputed (B + R, B + R) Gram matrix of the batch rows
        followed by the reference rows (skips the Gram computation).
      Returns the aggregated update (leaves *param.shape) and the new state.
    dtype: dtype of the Gram matrix and solve when computed here
      (``jnp.float64`` with x64 enabled).
    """
    def init(params):
        del params
        return policy.init()

    def update(updates, state, params=None, *, example_ids=None, mask=None,
               reference_grads=None, gram=None, **extra):
        del params, extra
        b = batch_size(updates, name="per-example gradients")
        check_example_ids(example_ids, b, state.disclosure.shape[0])
        if gram is None:
            gram = gram_matrix(_with_reference(updates, reference_grads), dtype=dtype)
        weights, new_state = policy.weights(gram, example_ids, mask, state)
        return aggregate(updates, weights), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def gnq_monitor(*, num_examples: int, reg, relative: bool = True, dtype: Any = None
                ) -> optax.GradientTransformationExtraArgs:
    """Mean of the per-example gradients (plain SGD), with a GNQ ledger
    (``GnqState``) per training example. See ``monitor_policy``."""
    return policy_transformation(
        monitor_policy(num_examples=num_examples, reg=reg, relative=relative), dtype=dtype)


def gnq_censor(*, budget, num_examples: int, reg, relative: bool = True,
               policy: str = "retire", dtype: Any = None
               ) -> optax.GradientTransformationExtraArgs:
    """Sum of the admitted per-example gradients / n (n real rows): example j
    is admitted while its disclosure D_j (nats) stays within ``budget``.
    See ``censor_policy``."""
    return policy_transformation(
        censor_policy(budget=budget, num_examples=num_examples, reg=reg,
                      relative=relative, policy=policy), dtype=dtype)


def gnq_clip(*, max_step_disclosure, num_examples: int, reg, relative: bool = True,
             dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """Per-example gradients scaled so that no step discloses more than
    ``max_step_disclosure`` nats about any example, then averaged over the n
    real rows. See ``clip_policy``."""
    return policy_transformation(
        clip_policy(max_step_disclosure=max_step_disclosure, num_examples=num_examples,
                    reg=reg, relative=relative), dtype=dtype)


def mean_aggregate() -> optax.GradientTransformationExtraArgs:
    """Plain SGD's mean gradient: sum over the real rows (``mask``) / their
    number, with no state; the non-private baseline. Like the GNQ
    transformations it leaves out a row whose gradient is not finite (the
    denominator still counts it)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, mask=None, **extra):
        del params, extra
        b = batch_size(updates, name="per-example gradients")
        real = _check_mask(mask, b)
        factors = finite_rows(updates).astype(jnp.float32)
        return aggregate(updates, _weights(factors, real)), state

    return optax.GradientTransformationExtraArgs(init, update)
