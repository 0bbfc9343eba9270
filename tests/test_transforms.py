"""GNQ transformations against a naive float64 reference built from the
definition S_-j = sum_{k != j} c_k^2 g_k g_k^T + lam I (P x P matrices)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gujax.grads import gram
from gujax.policies import GnqState, batch_stats, censor_policy, clip_policy
from gujax.transforms import gnq_censor, gnq_clip, gnq_monitor, mean_aggregate

SHAPES = {"w": (6, 3), "b": (3,)}
P = 21
NUM_EXAMPLES = 40
REG = 0.1


def make_grads(rng, b, scale=1.0):
    return {k: jnp.asarray(scale * rng.normal(size=(b,) + s), jnp.float32)
            for k, s in SHAPES.items()}


def flat(grads):
    """(B, P) float64 matrix of a per-example gradient pytree."""
    leaves = jax.tree_util.tree_leaves(grads)
    b = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(b, -1) for x in leaves], 1)


def unflat_mean(matrix, weights):
    """sum_j w_j row_j as a pytree of SHAPES (leaves in tree order: b, w)."""
    v = (np.asarray(weights, np.float64)[:, None] * matrix).sum(0)
    return {"b": v[:3], "w": v[3:].reshape(6, 3)}


def naive_gnq(rows, lam, factors=None, num_scored=None):
    """GNQ of c_j g_j for the first num_scored rows; reference rows after."""
    rows = np.asarray(rows, np.float64)
    n, p = rows.shape
    num_scored = n if num_scored is None else num_scored
    c = np.ones(n)
    if factors is not None:
        c[:num_scored] = factors
    scaled = rows * c[:, None]
    out = []
    for j in range(num_scored):
        others = np.delete(scaled, j, axis=0)
        s = others.T @ others + lam * np.eye(p)
        out.append(scaled[j] @ np.linalg.solve(s, scaled[j]))
    return np.array(out)


def relative_lam(rows, reg=REG):
    rows = np.asarray(rows, np.float64)
    return reg * np.sum(rows * rows) / rows.shape[0]


def tree_close(a, b, rtol=1e-4, atol=1e-6):
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k]),
                                   rtol=rtol, atol=atol)


def params0():
    return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


@functools.lru_cache(maxsize=None)
def jitted_update(tx):
    return jax.jit(lambda g, s, i, kw: tx.update(g, s, None, example_ids=i, **kw))


def run(tx, grads, ids, state=None, **kw):
    """One jitted update of tx; returns (update, state)."""
    state = tx.init(params0()) if state is None else state
    return jitted_update(tx)(grads, state, jnp.asarray(ids, jnp.int32), kw)


# ----------------------------------------------------------------------------


def test_monitor_is_the_mean_and_ledger_matches_definition():
    rng = np.random.default_rng(0)
    tx = gnq_monitor(num_examples=NUM_EXAMPLES, reg=REG)
    state = tx.init(params0())
    d_expected = np.zeros(NUM_EXAMPLES)
    gnq_expected = np.zeros(NUM_EXAMPLES)
    for step in range(2):
        grads = make_grads(rng, 10)
        ids = np.arange(10) + 5 * step  # ids 5..9 are used twice
        update, state = run(tx, grads, ids, state)
        rows = flat(grads)
        tree_close(update, unflat_mean(rows, np.full(10, 0.1)))
        scores = naive_gnq(rows, relative_lam(rows))
        np.add.at(gnq_expected, ids, scores)
        np.add.at(d_expected, ids, 0.5 * np.log1p(scores))
        np.testing.assert_allclose(np.asarray(state.last_gnq)[ids], scores, rtol=1e-4)
    np.testing.assert_allclose(state.disclosure, d_expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(state.cumulative_gnq, gnq_expected, rtol=1e-4, atol=1e-7)
    counts = np.zeros(NUM_EXAMPLES, int)
    np.add.at(counts, np.r_[np.arange(10), np.arange(10) + 5], 1)
    np.testing.assert_array_equal(state.steps_used, counts)
    assert int(state.step) == 2 and int(state.num_refused) == 0
    seen = d_expected[counts > 0]
    np.testing.assert_allclose(state.disclosure_quantiles[-1], seen.max(), rtol=1e-5)
    np.testing.assert_allclose(state.disclosure_quantiles[0], np.median(seen), rtol=1e-4)


def test_relative_false_uses_absolute_lam():
    rng = np.random.default_rng(1)
    grads = make_grads(rng, 8)
    _, state = run(gnq_monitor(num_examples=NUM_EXAMPLES, reg=0.5, relative=False),
                   grads, np.arange(8))
    np.testing.assert_allclose(state.last_gnq[:8], naive_gnq(flat(grads), 0.5), rtol=1e-4)


def test_censor_with_infinite_budget_equals_monitor():
    rng = np.random.default_rng(2)
    mon = gnq_monitor(num_examples=NUM_EXAMPLES, reg=REG)
    cen = gnq_censor(budget=float("inf"), num_examples=NUM_EXAMPLES, reg=REG)
    s_mon, s_cen = mon.init(params0()), cen.init(params0())
    for step in range(3):
        grads = make_grads(rng, 8)
        ids = rng.choice(NUM_EXAMPLES, 8, replace=False)
        u_mon, s_mon = run(mon, grads, ids, s_mon)
        u_cen, s_cen = run(cen, grads, ids, s_cen)
        tree_close(u_cen, u_mon, rtol=1e-6)
    np.testing.assert_allclose(s_cen.disclosure, s_mon.disclosure, rtol=1e-6)
    np.testing.assert_array_equal(s_cen.steps_used, s_mon.steps_used)
    assert not np.any(s_cen.retired)


def test_zero_budget_refuses_and_retires_every_example_seen():
    rng = np.random.default_rng(3)
    grads = make_grads(rng, 8)
    ids = np.arange(8) * 3
    update, state = run(gnq_censor(budget=0.0, num_examples=NUM_EXAMPLES, reg=REG),
                        grads, ids)
    for leaf in jax.tree_util.tree_leaves(update):
        np.testing.assert_array_equal(leaf, 0)
    expected = np.zeros(NUM_EXAMPLES, bool)
    expected[ids] = True
    np.testing.assert_array_equal(state.retired, expected)
    assert int(state.num_refused) == 8
    np.testing.assert_array_equal(state.disclosure, 0)


def planted_batch(rng, b=16, outlier_scale=30.0):
    """b - 1 gradients in a 3-dim subspace (plus small noise), and one huge
    gradient orthogonal to that subspace (row 0)."""
    basis = np.linalg.qr(rng.normal(size=(P, 4)))[0]
    ordinary = rng.normal(size=(b - 1, 3)) @ basis[:, :3].T + 0.01 * rng.normal(size=(b - 1, P))
    outlier = outlier_scale * basis[:, 3]
    rows = np.vstack([outlier, ordinary])
    grads = {"w": jnp.asarray(rows[:, :18].reshape(b, 6, 3), jnp.float32),
             "b": jnp.asarray(rows[:, 18:], jnp.float32)}
    return grads, flat(grads)


def test_planted_outlier_is_refused_and_ordinary_examples_pass():
    rng = np.random.default_rng(4)
    grads, rows = planted_batch(rng)
    lam = relative_lam(rows)
    d = 0.5 * np.log1p(naive_gnq(rows, lam))
    # Realised disclosure of the ordinary examples once the outlier is out.
    d_without = 0.5 * np.log1p(naive_gnq(rows, lam, factors=np.r_[0.0, np.ones(15)]))[1:]
    budget = 1.0
    assert d[0] > 2 * budget and d_without.max() < budget / 2  # the planted gap
    tx = optax.chain(gnq_censor(budget=budget, num_examples=NUM_EXAMPLES, reg=REG),
                     optax.identity())
    ids = np.arange(16)
    update, state = run(tx, grads, ids)
    state = state[0]
    assert bool(state.retired[0]) and not np.any(state.retired[1:])
    assert int(state.num_refused) == 1
    tree_close(update, unflat_mean(rows, np.r_[0.0, np.full(15, 1 / 16)]))
    np.testing.assert_allclose(state.disclosure[1:16], d_without, rtol=1e-3, atol=1e-6)
    assert float(state.disclosure[0]) == 0
    # Retired: refused again next step even with a tiny gradient.
    small = jax.tree_util.tree_map(lambda g: g * 1e-3, grads)
    _, state2 = run(gnq_censor(budget=budget, num_examples=NUM_EXAMPLES, reg=REG),
                    small, ids, state)
    assert int(state2.steps_used[0]) == 0


def test_skip_policy_does_not_retire():
    rng = np.random.default_rng(4)
    grads, _ = planted_batch(rng)
    _, state = run(gnq_censor(budget=1.0, num_examples=NUM_EXAMPLES, reg=REG,
                              policy="skip"), grads, np.arange(16))
    assert int(state.num_refused) == 1 and not np.any(state.retired)


def test_censor_realised_disclosure_never_exceeds_budget():
    rng = np.random.default_rng(5)
    budget = 1.5
    policy = censor_policy(budget=budget, num_examples=NUM_EXAMPLES, reg=REG)
    state = policy.init()
    for step in range(4):
        grads = make_grads(rng, 10)
        ids = rng.choice(NUM_EXAMPLES, 10, replace=False)
        rows = flat(grads)
        before = np.asarray(state.disclosure, np.float64)
        weights, state = jax.jit(policy.weights)(batch_stats(gram(grads)), jnp.asarray(ids), None, state)
        admitted = np.asarray(weights) > 0
        np.testing.assert_allclose(np.asarray(weights)[admitted], 0.1, rtol=1e-6)
        lam = relative_lam(rows)
        raw_d = 0.5 * np.log1p(naive_gnq(rows, lam))
        # The stated rule on the whole batch: any overrun is refused.
        assert not np.any(admitted & (before[ids] + raw_d > budget * (1 + 1e-4)))
        realised = 0.5 * np.log1p(naive_gnq(rows, lam, factors=admitted.astype(float)))
        after = before.copy()
        after[ids[admitted]] += realised[admitted]
        np.testing.assert_allclose(state.disclosure, after, rtol=1e-4, atol=1e-6)
        assert np.all(after <= budget * (1 + 1e-4))
    assert int(np.sum(state.retired)) > 0  # the budget did bind


def test_clip_keeps_realised_step_disclosure_within_cap():
    rng = np.random.default_rng(6)
    cap = 0.4
    s_max = np.expm1(2 * cap)
    tx = gnq_clip(max_step=cap, num_examples=NUM_EXAMPLES, reg=REG)
    policy = clip_policy(max_step=cap, num_examples=NUM_EXAMPLES, reg=REG)
    chained = optax.chain(tx, optax.adam(1e-2))
    state = chained.init(params0())
    for step in range(3):
        grads = make_grads(rng, 12)
        ids = np.arange(12) + 12 * step
        rows = flat(grads)
        weights, _ = jax.jit(policy.weights)(batch_stats(gram(grads)), jnp.asarray(ids), None, state[0])
        factors = np.asarray(weights, np.float64) * 12
        assert np.all((factors >= 0) & (factors <= 1 + 1e-7))
        lam = relative_lam(rows)
        raw = naive_gnq(rows, lam)
        assert raw.max() > 3 * s_max  # the cap binds for some rows
        assert np.sum(factors < 1) >= 1
        realised = naive_gnq(rows, lam, factors=factors)
        assert realised.max() <= s_max * (1 + 2e-4), (realised.max(), s_max)
        # Same factors through optax.chain(gnq_clip, adam) under jit.
        clipped = unflat_mean(rows, factors / 12)
        expected, _ = optax.adam(1e-2).update(
            jax.tree_util.tree_map(jnp.asarray, clipped), state[1], params0())
        update, state = run(chained, grads, ids, state)
        tree_close(update, expected, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(state[0].disclosure[ids], 0.5 * np.log1p(realised),
                                   rtol=1e-3, atol=1e-6)
        assert float(state[0].max_step_disclosure) <= cap * (1 + 2e-4)


def test_clip_leaves_unremarkable_batch_alone():
    rng = np.random.default_rng(7)
    grads, rows = planted_batch(rng)
    ordinary = jax.tree_util.tree_map(lambda g: g[1:], grads)
    update, state = run(gnq_clip(max_step=2.0, num_examples=NUM_EXAMPLES,
                                 reg=REG), ordinary, np.arange(15))
    assert int(state.num_clipped) == 0
    tree_close(update, unflat_mean(rows[1:], np.full(15, 1 / 15)))


@pytest.mark.parametrize("make", [
    lambda: gnq_monitor(num_examples=NUM_EXAMPLES, reg=REG),
    lambda: gnq_censor(budget=1.2, num_examples=NUM_EXAMPLES, reg=REG),
    lambda: gnq_clip(max_step=0.5, num_examples=NUM_EXAMPLES, reg=REG),
])
def test_padding_rows_change_nothing(make):
    rng = np.random.default_rng(8)
    grads = make_grads(rng, 8)
    ids = np.arange(8) + 10
    junk = {"w": jnp.full((3, 6, 3), jnp.nan), "b": jnp.full((3, 3), 1e6)}
    padded = jax.tree_util.tree_map(lambda g, j: jnp.concatenate([g, j]), grads, junk)
    padded_ids = np.r_[ids, [0, 1, 10]]  # padding ids collide with real ones
    mask = jnp.asarray(np.r_[np.ones(8, bool), np.zeros(3, bool)])
    tx = make()
    u_ref, s_ref = run(tx, grads, ids)
    u_pad, s_pad = run(tx, padded, padded_ids, mask=mask)
    tree_close(u_pad, u_ref, rtol=1e-5)
    for a, b in zip(s_pad, s_ref):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=1e-5, atol=1e-7)


def test_reference_rows_enter_s_but_are_not_scored_or_aggregated():
    rng = np.random.default_rng(9)
    grads = make_grads(rng, 6)
    reference = make_grads(rng, 5)
    ids = np.arange(6)
    tx = gnq_monitor(num_examples=NUM_EXAMPLES, reg=REG)
    update, state = run(tx, grads, ids, reference_grads=reference)
    rows = np.vstack([flat(grads), flat(reference)])
    scores = naive_gnq(rows, relative_lam(rows), num_scored=6)
    np.testing.assert_allclose(state.last_gnq[:6], scores, rtol=1e-4)
    assert np.all(np.isnan(state.last_gnq[6:]))
    assert np.all(np.asarray(state.steps_used[6:]) == 0)
    tree_close(update, unflat_mean(flat(grads), np.full(6, 1 / 6)))
    # Reference rows lower GNQ (more peers to hide among).
    _, alone = run(tx, grads, ids)
    assert np.all(np.asarray(state.last_gnq[:6]) < np.asarray(alone.last_gnq[:6]))
    # A precomputed Gram matrix gives the same result.
    both = jax.tree_util.tree_map(lambda g, r: jnp.concatenate([g, r]), grads, reference)
    u2, s2 = run(tx, grads, ids, gram=gram(both))
    tree_close(u2, update, rtol=1e-6)
    np.testing.assert_allclose(s2.disclosure, state.disclosure, rtol=1e-6)


def test_an_id_twice_in_a_batch_is_one_merged_contribution():
    """An example's contribution to a step is the sum of its rows. Two copies
    of g_0 (ids 3, 3) are scored and charged as the one row 2 g_0 against the
    others (naive definition: merge the rows, build S_-j in P x P, solve),
    not each copy against the other (which makes both look non-unique)."""
    rng = np.random.default_rng(10)
    grads = make_grads(rng, 8)
    grads = jax.tree_util.tree_map(lambda g: g.at[1].set(g[0]), grads)   # an exact copy
    ids = np.array([3, 3, 4, 5, 6, 7, 8, 9])
    _, state = run(gnq_monitor(num_examples=NUM_EXAMPLES, reg=REG), grads, ids)
    rows = flat(grads)
    merged = np.vstack([rows[0] + rows[1], rows[2:]])
    want = naive_gnq(merged, relative_lam(merged))
    d = 0.5 * np.log1p(want)
    np.testing.assert_allclose(state.cumulative_gnq[3], want[0], rtol=1e-4)
    np.testing.assert_allclose(state.disclosure[3], d[0], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state.disclosure)[4:10], d[1:], rtol=1e-4)
    # The old charge (each copy scored against the other, summed) is far lower.
    per_copy = 0.5 * np.log1p(naive_gnq(rows, relative_lam(rows)))
    assert per_copy[0] + per_copy[1] < 0.6 * d[0]
    assert int(state.steps_used[3]) == 1 and int(state.times_scored[3]) == 1
    # Censor: the merged contribution does not fit, so both rows are refused.
    budget = float(0.9 * d[0])
    _, cstate = run(gnq_censor(budget=budget, num_examples=NUM_EXAMPLES, reg=REG),
                    grads, ids)
    assert bool(cstate.retired[3]) and float(cstate.disclosure[3]) == 0
    assert np.all(np.asarray(cstate.disclosure) <= budget * (1 + 1e-4))
    # Clip: one factor for both rows; the merged contribution's d is capped.
    cap = float(0.5 * d[0])
    update, kstate = run(gnq_clip(max_step=cap, num_examples=NUM_EXAMPLES, reg=REG),
                         grads, ids)
    assert float(kstate.disclosure[3]) <= cap * (1 + 1e-3)


@pytest.mark.parametrize("make", [
    lambda: gnq_monitor(num_examples=NUM_EXAMPLES, reg=REG),
    lambda: gnq_censor(budget=float("inf"), num_examples=NUM_EXAMPLES, reg=REG),
    lambda: gnq_clip(max_step=5.0, num_examples=NUM_EXAMPLES, reg=REG),
])
def test_nonfinite_example_is_refused_and_does_not_poison(make):
    rng = np.random.default_rng(11)
    grads = make_grads(rng, 8)
    bad = jax.tree_util.tree_map(lambda g: g.at[2].set(jnp.nan), grads)
    ids = np.arange(8)
    update, state = run(optax.chain(make(), optax.adam(1e-2)), bad, ids)
    assert all(np.all(np.isfinite(l)) for l in jax.tree_util.tree_leaves(update))
    state = state[0]
    assert int(state.num_nonfinite) == 1 and int(state.num_refused) == 1
    assert int(state.steps_used[2]) == 0 and float(state.disclosure[2]) == 0
    assert np.isnan(state.last_gnq[2])
    keep = np.r_[0:2, 3:8]
    rows = flat(grads)[keep]
    np.testing.assert_allclose(np.asarray(state.last_gnq)[keep],
                               naive_gnq(rows, relative_lam(rows)), rtol=1e-4)
    # The update is the others' sum over the fixed denominator 8.
    plain, _ = run(mean_aggregate(), bad, ids)
    expected = unflat_mean(flat(grads), np.r_[[1 / 8] * 2, 0, [1 / 8] * 5])
    tree_close(plain, expected)


def test_bad_input_is_rejected():
    rng = np.random.default_rng(12)
    grads = make_grads(rng, 4)
    tx = gnq_censor(budget=1.0, num_examples=10, reg=REG)
    state = tx.init(params0())
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        tx.update(grads, state, example_ids=jnp.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="shape"):
        tx.update(grads, state, example_ids=jnp.arange(3))
    with pytest.raises(ValueError, match="required"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="integers"):
        tx.update(grads, state, example_ids=jnp.arange(4.0))
    with pytest.raises(ValueError, match="mask"):
        tx.update(grads, state, example_ids=jnp.arange(4), mask=jnp.ones(4))
    with pytest.raises(ValueError, match="square"):
        tx.update(grads, state, example_ids=jnp.arange(4), gram=jnp.eye(3))
    with pytest.raises(ValueError, match="structure"):
        tx.update(grads, state, example_ids=jnp.arange(4), reference_grads={"w": grads["w"]})
    with pytest.raises(ValueError, match="empty"):
        tx.update(jax.tree_util.tree_map(lambda g: g[:0], grads), state,
                  example_ids=jnp.zeros((0,), jnp.int32))
    for kwargs, match in [({"budget": -1.0}, "budget"), ({"budget": float("nan")}, "budget"),
                          ({"budget": 1.0, "policy": "drop"}, "policy"),
                          ({"budget": 1.0, "reg": 0.0}, "reg"),
                          ({"budget": 1.0, "num_examples": 0}, "num_examples")]:
        kwargs = {"num_examples": 10, "reg": REG, **kwargs}
        with pytest.raises(ValueError, match=match):
            gnq_censor(**kwargs)
    with pytest.raises(ValueError, match="max_step"):
        gnq_clip(max_step=0.0, num_examples=10, reg=REG)


def test_out_of_range_id_under_jit_is_treated_as_padding():
    rng = np.random.default_rng(13)
    grads = make_grads(rng, 5)
    tx = gnq_monitor(num_examples=10, reg=REG)
    update, state = run(tx, grads, np.array([0, 1, 2, 3, 99]))
    assert int(state.num_bad_ids) == 1 and int(state.num_scored) == 4
    four = jax.tree_util.tree_map(lambda g: g[:4], grads)
    u4, s4 = run(tx, four, np.arange(4))
    tree_close(update, u4, rtol=1e-5)
    np.testing.assert_allclose(state.disclosure, s4.disclosure, rtol=1e-5)


def test_state_is_a_namedtuple_of_arrays_and_deterministic():
    rng = np.random.default_rng(14)
    grads = make_grads(rng, 8)
    tx = gnq_clip(max_step=0.3, num_examples=NUM_EXAMPLES, reg=REG)
    a = run(tx, grads, np.arange(8))
    b = run(tx, grads, np.arange(8))
    assert isinstance(a[1], GnqState)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    metrics = a[1].step_metrics()
    assert all(jnp.ndim(v) == 0 for v in metrics.values())


# ------------------------------------------------------- proposed thresholds

def test_propose_thresholds_reads_the_monitor_ledger():
    """budget = the censor_quantile quantile of D_j, max_step = the
    clip_quantile quantile of D_j / steps_used_j, over the examples used."""
    from gujax.policies import Ledger
    from gujax.transforms import Thresholds, propose_thresholds
    d = np.array([0.0, 4.0, 1.0, 9.0, 2.0, 7.0], np.float32)
    used = np.array([0, 4, 1, 3, 2, 7], np.int32)  # example 0 never used
    z = np.zeros(6, np.float32)
    ledger = Ledger(z, d, used, used, np.zeros(6, bool), z, np.int32(7))
    got = propose_thresholds(ledger, censor_quantile=0.75, clip_quantile=0.5)
    assert isinstance(got, Thresholds)
    assert got.budget == pytest.approx(np.quantile([4, 1, 9, 2, 7], 0.75))
    assert got.max_step == pytest.approx(np.median([1, 1, 3, 1, 1]))
    with pytest.raises(ValueError, match="censor_quantile"):
        propose_thresholds(ledger, censor_quantile=1.5)
    with pytest.raises(ValueError, match="used no example"):
        propose_thresholds(ledger._replace(steps_used=np.zeros(6, np.int32)))
    with pytest.raises(ValueError, match="ledger"):
        propose_thresholds({"disclosure": d})

    # From a monitor run's optax state (a GnqState), and the proposal works
    # as the censor's budget: it refuses at least the examples over it.
    rng = np.random.default_rng(0)
    n, b = 40, 10
    mon = gnq_monitor(num_examples=n, reg=0.1)
    state = mon.init(None)
    grads = [{"w": jnp.asarray(rng.normal(size=(b, 30)), jnp.float32)} for _ in range(8)]
    batches = [rng.choice(n, b, replace=False) for _ in range(8)]
    for g, ids in zip(grads, batches):
        _, state = mon.update(g, state, example_ids=jnp.asarray(ids))
    proposed = propose_thresholds(state, censor_quantile=0.5)
    seen = np.asarray(state.steps_used) > 0
    assert proposed.budget == pytest.approx(np.median(np.asarray(state.disclosure)[seen]))
    cen = gnq_censor(budget=proposed.budget, num_examples=n, reg=0.1)
    cstate = cen.init(None)
    for g, ids in zip(grads, batches):
        _, cstate = cen.update(g, cstate, example_ids=jnp.asarray(ids))
    assert np.asarray(cstate.retired).sum() >= 0.4 * seen.sum()
    assert float(np.max(cstate.disclosure)) <= proposed.budget * (1 + 1e-5)
