"""GNQ kernel against a reference written straight from the definition."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gujax


def naive_gnq(g, lam, num_scored=None):
    """S_-j = sum_{k != j} g_k g_k^T + lam I in P x P, then g_j^T S_-j^-1 g_j (numpy float64)."""
    g = np.asarray(g, np.float64)
    n, p = g.shape
    num_scored = n if num_scored is None else num_scored
    out = []
    for j in range(num_scored):
        others = np.delete(g, j, axis=0)
        s = others.T @ others + lam * np.eye(p)
        out.append(g[j] @ np.linalg.solve(s, g[j]))
    return np.array(out)


def flat(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    n = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(n, -1) for x in leaves], axis=1)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(7)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.GroupNorm(num_groups=2)(x)
        x = x.mean(axis=(-3, -2))
        return nn.Dense(3)(x)


def xent(model):
    def loss(params, ex):
        logits = model.apply({"params": params}, ex["x"][None])[0]
        return -jax.nn.log_softmax(logits)[ex["y"]]
    return loss


def model_grads(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        model, x = MLP(), rng.normal(size=(n, 5))
    else:
        model, x = CNN(), rng.normal(size=(n, 6, 6, 2))
    y = rng.integers(0, 3, size=n)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    params = model.init(jax.random.key(seed), batch["x"][:1])["params"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, batch["x"].dtype), params)
    return gujax.per_example_grads(xent(model), params, batch)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("relative,reg", [(False, 1e-2), (False, 0.3), (True, 1e-2), (True, 0.5)])
@pytest.mark.parametrize("num_refs", [0, 4])
def test_matches_naive_reference_float64(kind, relative, reg, num_refs):
    with jax.enable_x64(True):
        grads = model_grads(kind, 10 + num_refs)
        assert jax.tree_util.tree_leaves(grads)[0].dtype == jnp.float64
        g = flat(grads)
        num_scored = 10 if num_refs else None
        lam = reg * np.trace(g @ g.T) / g.shape[0] if relative else reg
        want = naive_gnq(g, lam, num_scored)
        got = gujax.gnq(grads, reg=reg, relative=relative, num_scored=num_scored)
        assert got.dtype == jnp.float64 and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8)
        got_k = gujax.gnq_from_gram(gujax.gram(grads), reg=reg, relative=relative,
                                    num_scored=num_scored)
        np.testing.assert_allclose(np.asarray(got_k), want, rtol=1e-8)


@pytest.mark.parametrize("n", [65, 100, 150])
def test_blocked_solve_matches_naive_reference_float64(n):
    # Past 64 rows the solve is blocked by halves (odd halves included).
    rng = np.random.default_rng(n)
    g = rng.normal(size=(n, 40)) @ rng.normal(size=(40, 200))   # rank 40 < n
    g[7] = g[3]                                                  # a duplicate
    g += 0.05 * rng.normal(size=g.shape)
    with jax.enable_x64(True):
        got = gujax.gnq_from_gram(jnp.asarray(g @ g.T), reg=0.1, relative=False)
    np.testing.assert_allclose(np.asarray(got), naive_gnq(g, 0.1), rtol=1e-8)


def test_blocked_solve_float32_against_float64():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(256, 64)) @ rng.normal(size=(64, 500)) + 0.1 * rng.normal(size=(256, 500))
    k = g @ g.T
    with jax.enable_x64(True):
        want = np.asarray(gujax.gnq_from_gram(jnp.asarray(k), reg=1e-2))
    got = np.asarray(gujax.gnq_from_gram(jnp.asarray(k, jnp.float32), reg=1e-2))
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_orthogonal_gradients():
    with jax.enable_x64(True):
        g = np.zeros((4, 6))
        for j, v in enumerate([1.0, 2.0, -0.5, 3.0]):
            g[j, j] = v
        lam = 0.7
        got = gujax.gnq({"w": jnp.asarray(g)}, reg=lam, relative=False)
        np.testing.assert_allclose(got, (g ** 2).sum(1) / lam, rtol=1e-12)


def test_duplicate_pair_is_much_less_unique():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(6, 50))
    alone = gujax.gnq({"w": jnp.asarray(g)}, reg=1e-2)
    dup = np.concatenate([g, g[:1]])
    with_dup = gujax.gnq({"w": jnp.asarray(dup)}, reg=1e-2)
    # A copy in S_-j caps GNQ below g^T (g g^T + lam I)^-1 g < 1.
    assert alone[0] > 10
    assert with_dup[0] < 1 and with_dup[-1] < 1
    np.testing.assert_allclose(with_dup[0], with_dup[-1], rtol=1e-5)


def test_permutation_equivariance_and_scale_invariance():
    rng = np.random.default_rng(2)
    g = jnp.asarray(rng.normal(size=(8, 20)))
    base = gujax.gnq({"w": g}, reg=0.3, relative=False)
    perm = rng.permutation(8)
    np.testing.assert_allclose(gujax.gnq({"w": g[perm]}, reg=0.3, relative=False),
                               base[perm], rtol=1e-5)
    c = 7.0
    np.testing.assert_allclose(gujax.gnq({"w": c * g}, reg=0.3 * c * c, relative=False),
                               base, rtol=1e-4)
    # The relative regulariser is scale-free by construction.
    np.testing.assert_allclose(gujax.gnq({"w": c * g}, reg=0.1), gujax.gnq({"w": g}, reg=0.1),
                               rtol=1e-4)


def test_all_zero_gradients_disclose_nothing():
    got = gujax.gnq({"w": jnp.zeros((5, 3))}, reg=0.1)
    np.testing.assert_array_equal(got, np.zeros(5))


def test_nonfinite_example_is_isolated():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(7, 12)).astype(np.float32)
    clean = np.asarray(gujax.gnq({"w": jnp.asarray(np.delete(g, 2, 0))}, reg=0.05))
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = g.copy()
        poisoned[2, 5] = bad
        got = np.asarray(gujax.gnq({"w": jnp.asarray(poisoned), "b": jnp.ones((7, 2))}, reg=0.05,
                                   relative=False))
        ref = np.asarray(gujax.gnq({"w": jnp.asarray(np.delete(g, 2, 0)), "b": jnp.ones((6, 2))},
                                   reg=0.05, relative=False))
        assert np.isnan(got[2])
        np.testing.assert_allclose(np.delete(got, 2), ref, rtol=1e-5)
        # The same through a precomputed Gram matrix, relative lam over the valid rows.
        k = gujax.gram({"w": jnp.asarray(poisoned)})
        got_k = np.asarray(gujax.gnq_from_gram(k, reg=0.05))
        assert np.isnan(got_k[2])
        np.testing.assert_allclose(np.delete(got_k, 2), clean, rtol=1e-5)


def test_disclosure():
    x = jnp.asarray([0.0, 1.0, np.e - 1, np.nan])
    np.testing.assert_allclose(gujax.disclosure(x), [0.0, 0.5 * np.log(2), 0.5, np.nan])


@pytest.mark.parametrize("call,match", [
    (lambda g: gujax.gnq(g, reg=0.0), "reg"),
    (lambda g: gujax.gnq(g, reg=-1.0), "reg"),
    (lambda g: gujax.gnq(g, reg=float("nan")), "reg"),
    (lambda g: gujax.gnq(g, reg=0.1, num_scored=0), "num_scored"),
    (lambda g: gujax.gnq(g, reg=0.1, num_scored=5), "num_scored"),
    (lambda g: gujax.gnq({"a": g["w"], "b": jnp.ones((3, 2))}, reg=0.1), "leading"),
    (lambda g: gujax.gnq({"w": jnp.ones((0, 3))}, reg=0.1), "empty"),
    (lambda g: gujax.gnq({}, reg=0.1), "no array leaves"),
    (lambda g: gujax.gnq_from_gram(jnp.ones((3, 2)), reg=0.1), "square"),
    (lambda g: gujax.gnq_from_gram(jnp.ones((0, 0)), reg=0.1), "empty"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call({"w": jnp.ones((4, 3))})


def test_jit_with_traced_reg():
    g = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(5, 9)))}
    f = jax.jit(lambda g, r: gujax.gnq(g, reg=r))
    np.testing.assert_allclose(f(g, 0.2), gujax.gnq(g, reg=0.2), rtol=1e-6)


def test_float32_against_float64_bound():
    """Documented bound: float32 GNQ within 1e-3 relative of float64 here (README)."""
    with jax.enable_x64(True):
        g64 = flat(model_grads("mlp", 32, seed=5))
        want = np.asarray(gujax.gnq({"w": jnp.asarray(g64)}, reg=1e-2))
        mixed = np.asarray(gujax.gnq({"w": jnp.asarray(g64, jnp.float32)}, reg=1e-2,
                                     dtype=jnp.float64))
        assert mixed.dtype == np.float64
    got32 = np.asarray(gujax.gnq({"w": jnp.asarray(g64, jnp.float32)}, reg=1e-2))
    assert got32.dtype == np.float32
    assert np.max(np.abs(got32 - want) / want) < 1e-3
    # float32 gradients with a float64 Gram and solve: only the rounding of the inputs.
    assert np.max(np.abs(mixed - want) / want) < 1e-5


def test_traced_bad_reg_gives_nan_scores_not_a_silent_floor():
    """A reg that cannot be checked (traced under jit) and is zero, negative or
    NaN must not turn into some default lam: every score is NaN."""
    rng = np.random.default_rng(3)
    g = {"w": jnp.asarray(rng.normal(size=(5, 4)))}
    scored = jax.jit(lambda reg: gujax.gnq(g, reg=reg, relative=False))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        assert np.all(np.isnan(np.asarray(scored(bad)))), bad
    k = gujax.gram(g)
    from_gram = jax.jit(lambda reg: gujax.gnq_from_gram(k, reg=reg))
    assert np.all(np.isnan(np.asarray(from_gram(-0.5))))
    # jit fuses differently from eager: equal to float32 rounding (a CI run
    # differed by 1.4e-6 relative, so 1e-6 was too tight).
    np.testing.assert_allclose(scored(0.3), gujax.gnq(g, reg=0.3, relative=False), rtol=1e-5)
    # A zero trace with a valid relative reg is not an error: every score is 0.
    zeros = jax.jit(lambda reg: gujax.gnq({"w": jnp.zeros((4, 3))}, reg=reg))(0.1)
    np.testing.assert_array_equal(zeros, 0.0)
