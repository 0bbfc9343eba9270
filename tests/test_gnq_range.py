"""GNQ across the float range (issue 28 items 6 and 7): half-precision inputs,
common scales from 1e-20 to 1e19, one huge finite row, against a reference
written straight from the definition (S_-j as a P x P matrix, numpy float64)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gujax


def naive_gnq(g, lam):
    """g_j^T S_-j^-1 g_j with S_-j = sum_{k != j} g_k g_k^T + lam I (float64)."""
    g = np.asarray(g, np.float64)
    n, p = g.shape
    out = []
    for j in range(n):
        others = np.delete(g, j, axis=0)
        s = others.T @ others + lam * np.eye(p)
        out.append(g[j] @ np.linalg.solve(s, g[j]))
    return np.array(out)


def naive_lam(g, reg, relative):
    g = np.asarray(g, np.float64)
    return reg * np.sum(g * g) / g.shape[0] if relative else reg


def rows(n, p, seed):
    return np.random.default_rng(seed).normal(size=(n, p))


# --- item 6: half precision -------------------------------------------------

@pytest.mark.parametrize("dt,loose", [(jnp.float16, 5e-3), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("n,p", [(8, 20), (100, 30)])   # 100 > 64: the blocked solve
@pytest.mark.parametrize("relative,reg", [(True, 0.1), (False, 0.5)])
def test_half_precision_gradients_are_solved_in_float32(dt, loose, n, p, relative, reg):
    g = rows(n, p, seed=n + p)
    half = jnp.asarray(g, dt)
    got = np.asarray(gujax.gnq({"w": half}, reg=reg, relative=relative))
    assert got.dtype == np.float32
    # Against the definition on the half-rounded inputs: only the float32 solve.
    rounded = np.asarray(half).astype(np.float64)
    np.testing.assert_allclose(got, naive_gnq(rounded, naive_lam(rounded, reg, relative)),
                               rtol=5e-4)
    # Against the unrounded gradients: the rounding of the inputs on top.
    np.testing.assert_allclose(got, naive_gnq(g, naive_lam(g, reg, relative)), rtol=loose)
    # gnq_from_gram of a half-precision K, and the Gram itself, go to float32.
    k = gujax.gram({"w": half})
    assert k.dtype == jnp.float32
    from_k = np.asarray(gujax.gnq_from_gram(k, reg=reg, relative=relative))
    assert from_k.dtype == np.float32
    np.testing.assert_allclose(from_k, got, rtol=5e-4)
    from_half_k = gujax.gnq_from_gram(k.astype(dt), reg=reg, relative=relative)
    assert from_half_k.dtype == jnp.float32 and np.all(np.isfinite(from_half_k))


def test_float16_gradients_past_its_squared_range():
    # Entries ~ 500: every squared norm (~1e7) overflows float16 (max 65504).
    g = jnp.asarray(rows(10, 25, seed=1), jnp.float16)
    base = np.asarray(gujax.gnq({"w": g}, reg=0.1))
    big = np.asarray(gujax.gnq({"w": g * jnp.float16(512)}, reg=0.1))
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big, base, rtol=1e-6)


def test_mixed_precision_leaves():
    g = rows(9, 14, seed=2)
    tree = {"a": jnp.asarray(g[:, :6], jnp.bfloat16), "b": jnp.asarray(g[:, 6:], jnp.float32)}
    got = np.asarray(gujax.gnq(tree, reg=0.2))
    assert got.dtype == np.float32
    used = np.concatenate([np.asarray(tree["a"], np.float64), g[:, 6:]], axis=1)
    np.testing.assert_allclose(got, naive_gnq(used, naive_lam(used, 0.2, True)), rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.int32, jnp.complex64])
def test_unsupported_requested_dtype_is_a_clear_error(dtype):
    g = {"w": jnp.asarray(rows(5, 4, seed=3), jnp.float32)}
    with pytest.raises(ValueError, match="float32 or float64"):
        gujax.gnq(g, reg=0.1, dtype=dtype)


def test_half_precision_ghost_gram_accumulates_in_float32():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    def loss(params, ex):
        logits = Net().apply({"params": params}, ex["x"][None])[0]
        return -jax.nn.log_softmax(logits.astype(jnp.float32))[ex["y"]].astype(logits.dtype)

    rng = np.random.default_rng(4)
    batch = {"x": jnp.asarray(rng.normal(size=(12, 5)), jnp.bfloat16),
             "y": jnp.asarray(rng.integers(0, 3, size=12))}
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16),
                          "bias": jnp.zeros((3,), jnp.bfloat16)}}

    @jax.jit
    def run(params, batch):
        k = gujax.ghost.ghost_gram(loss, params, batch)
        want_k = gujax.gram(gujax.per_example_grads(loss, params, batch))
        return k, want_k, gujax.gnq_from_gram(k, reg=0.1), gujax.gnq_from_gram(want_k, reg=0.1)

    k, want_k, scores, want = run(params, batch)
    assert k.dtype == jnp.float32 and want_k.dtype == jnp.float32
    # The ghost kernel multiplies the bf16 factors in float32; the explicit
    # path rounds each per-example gradient to bf16 first.
    np.testing.assert_allclose(k, want_k, rtol=3e-2, atol=3e-2 * float(jnp.max(want_k)))
    assert scores.dtype == jnp.float32 and np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, want, rtol=0.1)


# --- item 7: scale-free across the float range -------------------------------

@pytest.mark.parametrize("n,p", [(6, 5), (12, 30), (80, 20)])
def test_common_scale_leaves_scores_unchanged(n, p):
    g = rows(n, p, seed=5 * n).astype(np.float32)
    want = naive_gnq(g, naive_lam(g, 0.05, True))
    base = np.asarray(gujax.gnq({"w": jnp.asarray(g)}, reg=0.05))
    np.testing.assert_allclose(base, want, rtol=1e-4)
    for scale in (1e-20, 1e-10, 1.0, 1e10, 1e19):
        scaled = jnp.asarray(g * np.float32(scale))
        got = np.asarray(gujax.gnq({"w": scaled}, reg=0.05))
        np.testing.assert_allclose(got, base, rtol=1e-4, err_msg=f"scale {scale}")
        # An absolute reg scaled with the squared gradients: the same scores.
        lam = 2.0
        ref = np.asarray(gujax.gnq({"w": jnp.asarray(g)}, reg=lam, relative=False))
        got_abs = np.asarray(gujax.gnq({"w": scaled}, reg=lam * scale * scale, relative=False))
        np.testing.assert_allclose(got_abs, ref, rtol=1e-4, err_msg=f"scale {scale}")


def test_absolute_reg_matches_definition_at_extreme_scales():
    g = rows(10, 15, seed=6)
    for scale in (1e-20, 1e19):
        gs = (g * scale).astype(np.float32)
        lam = 0.2 * scale * scale
        want = naive_gnq(np.asarray(gs, np.float64), lam)
        got = np.asarray(gujax.gnq({"w": jnp.asarray(gs)}, reg=lam, relative=False))
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"scale {scale}")


def test_absolute_reg_far_above_the_gradients_gives_zero_not_nan():
    # lam / max|g|^2 = 1e48: lam' overflows float32 after the rescaling;
    # the exact GNQ is < 1e-45, i.e. 0.
    g = jnp.asarray(rows(7, 9, seed=7) * 1e-20, jnp.float32)
    got = np.asarray(gujax.gnq({"w": g}, reg=1e8, relative=False))
    np.testing.assert_array_equal(got, 0.0)


def test_one_huge_finite_row_only_affects_itself():
    g = rows(9, 12, seed=8).astype(np.float32)
    g[3] *= np.float32(1e30)          # finite in float32; its squared norm is not
    reg = 0.1
    want = naive_gnq(np.asarray(g, np.float64), naive_lam(g, reg, True))
    got = np.asarray(gujax.gnq({"w": jnp.asarray(g)}, reg=reg))
    assert np.all(np.isfinite(got))
    # The others are ~1e-59 against lam ~ reg * trace / N ~ 1e59: zero.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got[3] > 1


def test_nonfinite_row_still_scores_nan_only_for_itself():
    g = rows(8, 10, seed=9).astype(np.float32)
    for scale in (1e-20, 1.0, 1e19):
        poisoned = g * np.float32(scale)
        poisoned[5, 2] = np.nan
        if scale == 1.0:
            poisoned[2] *= np.float32(1e30)      # and a huge finite row beside it
        got = np.asarray(gujax.gnq({"w": jnp.asarray(poisoned)}, reg=0.05))
        rest = np.delete(poisoned, 5, axis=0)
        want = naive_gnq(np.asarray(rest, np.float64), naive_lam(rest, 0.05, True))
        assert np.isnan(got[5]) and np.all(np.isfinite(np.delete(got, 5)))
        np.testing.assert_allclose(np.delete(got, 5), want, rtol=1e-4, atol=1e-6,
                                   err_msg=f"scale {scale}")


@pytest.mark.parametrize("n", [8, 80])   # 80 > 64: the blocked solve
def test_gnq_from_gram_with_a_scaled_k(n):
    g = rows(n, 20, seed=10 + n)
    k = (g @ g.T).astype(np.float32)
    lam = 0.4
    base_rel = np.asarray(gujax.gnq_from_gram(jnp.asarray(k), reg=0.05))
    base_abs = np.asarray(gujax.gnq_from_gram(jnp.asarray(k), reg=lam, relative=False))
    np.testing.assert_allclose(base_rel, naive_gnq(g, naive_lam(g, 0.05, True)), rtol=1e-4)
    np.testing.assert_allclose(base_abs, naive_gnq(g, lam), rtol=1e-4)
    # Up to diagonal entries ~ 1e37: the trace of 80 of them overflows float32.
    for c2 in (1e-30, 1e-18, 1e18, 5e35):
        kc = jnp.asarray(k * np.float32(c2))
        np.testing.assert_allclose(gujax.gnq_from_gram(kc, reg=0.05), base_rel, rtol=1e-4,
                                   err_msg=f"scale {c2}")
        # As policies.py calls it: an absolute lam scaled with K.
        got = gujax.gnq_from_gram(kc, reg=lam * c2, relative=False)
        np.testing.assert_allclose(got, base_abs, rtol=1e-4, err_msg=f"scale {c2}")


def test_regulariser_does_not_overflow_where_lam_is_finite():
    k = jnp.full((80,), 2e37, jnp.float32) * jnp.eye(80)   # trace 1.6e39 > float32 max
    np.testing.assert_allclose(gujax.regulariser(k, 0.5), 1e37, rtol=1e-6)
    half = gujax.regulariser(jnp.eye(4, dtype=jnp.bfloat16) * 3, 0.1)
    assert half.dtype == jnp.float32


def test_jit_with_traced_reg_and_extreme_scales():
    g = rows(12, 8, seed=11).astype(np.float32)
    g[4] *= np.float32(1e30)
    g[7, 0] = np.inf
    rel = jax.jit(lambda g, r: gujax.gnq({"w": g}, reg=r))
    got = np.asarray(rel(jnp.asarray(g), 0.1))
    np.testing.assert_allclose(got, gujax.gnq({"w": jnp.asarray(g)}, reg=0.1), rtol=1e-6)
    assert np.isnan(got[7]) and np.all(np.isfinite(np.delete(got, 7)))
    small = rows(12, 8, seed=11).astype(np.float32)
    absolute = jax.jit(lambda g, r: gujax.gnq({"w": g}, reg=r, relative=False))
    want = np.asarray(gujax.gnq({"w": jnp.asarray(small)}, reg=0.3, relative=False))
    for scale in (1e-15, 1e15):
        gs = jnp.asarray(small * np.float32(scale))
        np.testing.assert_allclose(absolute(gs, 0.3 * scale * scale), want, rtol=1e-4)
    from_gram = jax.jit(lambda k, r: gujax.gnq_from_gram(k, reg=r, relative=False))
    k = jnp.asarray(rows(6, 9, seed=12), jnp.float32)
    k = k @ k.T
    np.testing.assert_allclose(from_gram(k * 1e36, 0.3 * 1e36), from_gram(k, 0.3), rtol=1e-4)
    assert np.all(np.isnan(np.asarray(from_gram(k, -1.0))))
