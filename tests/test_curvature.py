"""Input-loss curvature: Hutchinson against exact Hessians."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gujax.audit.curvature import (CurvatureEstimate, curvature_over_checkpoints,
                                   exact_input_hessian_trace, input_curvature)


class TanhMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(-1)
        return nn.Dense(4)(jnp.tanh(nn.Dense(16)(x)))


def _xent(logits, y):
    return -jax.nn.log_softmax(logits)[y]


def _mlp_setup(n=16, shape=(3, 4), seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(n, *shape)), dtype)
    labels = jnp.asarray(rng.integers(0, 4, size=n))
    model = TanhMLP()
    params = model.init(jax.random.key(seed), images[0])["params"]
    params = jax.tree_util.tree_map(lambda a: (2.0 * a).astype(dtype), params)

    def loss(p, x, y):
        return _xent(model.apply({"params": p}, x), y)
    return loss, params, images, labels


def _full_hessians(loss, params, images, labels):
    d = images[0].size
    one = lambda x, y: jax.hessian(lambda z: loss(params, z, y))(x).reshape(d, d)
    return np.asarray(jax.vmap(one)(images, labels))


def test_exact_trace_matches_softmax_regression_closed_form():
    # loss = -log softmax(W x + b)_y has input Hessian W^T (diag(p) - p p^T) W.
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
        images, labels = rng.normal(size=(6, 5)), np.array([0, 1, 2, 0, 1, 2])

        def loss(p, x, y):
            return _xent(p["w"] @ x + p["b"], y)
        params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
        want_tr, want_sq = [], []
        for x in images:
            z = w @ x + b
            p = np.exp(z - z.max())
            p /= p.sum()
            hess = w.T @ (np.diag(p) - np.outer(p, p)) @ w
            want_tr.append(np.trace(hess))
            want_sq.append(np.sum(hess ** 2))
        got = exact_input_hessian_trace(loss, params, jnp.asarray(images), jnp.asarray(labels))
        got_sq = exact_input_hessian_trace(loss, params, jnp.asarray(images),
                                           jnp.asarray(labels), squared=True)
        np.testing.assert_allclose(got, want_tr, rtol=1e-12)
        np.testing.assert_allclose(got_sq, want_sq, rtol=1e-12)


def test_diagonal_hessian_is_estimated_exactly():
    # For a diagonal Hessian every Rademacher probe gives v^T A v = tr A exactly.
    with jax.enable_x64(True):
        a = jnp.asarray([0.5, -2.0, 3.0, 1.5])

        def loss(p, x, y):
            return 0.5 * jnp.sum(p * x * x) + y * jnp.sum(x)
        images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
        labels = jnp.arange(3.0)
        est = input_curvature(loss, a, images, labels, key=jax.random.key(0), num_probes=4)
        assert isinstance(est, CurvatureEstimate)
        np.testing.assert_allclose(est.trace, float(jnp.sum(a)), rtol=1e-14)
        np.testing.assert_allclose(est.stderr, 0.0, atol=1e-14)
        sq = input_curvature(loss, a, images, labels, key=jax.random.key(0), num_probes=4,
                             squared=True)
        np.testing.assert_allclose(sq.trace, float(jnp.sum(a * a)), rtol=1e-14)


def test_hutchinson_converges_to_exact_trace():
    with jax.enable_x64(True):
        loss, params, images, labels = _mlp_setup()
        exact = np.asarray(exact_input_hessian_trace(loss, params, images, labels))
        hess = _full_hessians(loss, params, images, labels)
        np.testing.assert_allclose(exact, np.trace(hess, axis1=1, axis2=2), rtol=1e-10)

        key = jax.random.key(1)
        few = input_curvature(loss, params, images, labels, key=key, num_probes=8)
        many = input_curvature(loss, params, images, labels, key=key, num_probes=512)
        rms = lambda est: np.sqrt(np.mean((np.asarray(est.trace) - exact) ** 2))
        # 64x the probes: the error should shrink by about sqrt(64) = 8.
        print("rms error, 8 probes:", rms(few), " 512 probes:", rms(many))
        assert rms(many) < rms(few) / 4, (rms(few), rms(many))
        # With many probes the estimate is within a few standard errors...
        z = (np.asarray(many.trace) - exact) / np.asarray(many.stderr)
        assert np.all(np.abs(z) < 5), z
        # ...and the standard error matches the Rademacher variance
        # Var(v^T H v) = 2 (|H|_F^2 - sum_i H_ii^2).
        var = 2 * (np.sum(hess ** 2, axis=(1, 2)) - np.sum(np.diagonal(hess, 0, 1, 2) ** 2, 1))
        np.testing.assert_allclose(np.asarray(many.stderr) ** 2 * 512, var, rtol=0.35)


def test_squared_trace_converges_to_frobenius_norm():
    with jax.enable_x64(True):
        loss, params, images, labels = _mlp_setup(n=8)
        exact = np.asarray(exact_input_hessian_trace(loss, params, images, labels,
                                                     squared=True))
        hess = _full_hessians(loss, params, images, labels)
        np.testing.assert_allclose(exact, np.sum(hess ** 2, axis=(1, 2)), rtol=1e-10)
        est = input_curvature(loss, params, images, labels, key=jax.random.key(2),
                              num_probes=256, squared=True)
        z = (np.asarray(est.trace) - exact) / np.asarray(est.stderr)
        assert np.all(np.abs(z) < 5), z


@pytest.mark.parametrize("chunk", [2, 100])
def test_chunked_equals_unchunked_and_deterministic(chunk):
    loss, params, images, labels = _mlp_setup(n=7, dtype=jnp.float32)
    key = jax.random.key(3)
    full = input_curvature(loss, params, images, labels, key=key, num_probes=6)
    chunked = jax.jit(lambda p: input_curvature(loss, p, images, labels, key=key,
                                                num_probes=6, chunk_size=chunk))(params)
    np.testing.assert_allclose(chunked.trace, full.trace, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked.stderr, full.stderr, rtol=1e-5, atol=1e-6)
    # Probes depend on the example's index only, not on the rest of the batch.
    head = input_curvature(loss, params, images[:5], labels[:5], key=key, num_probes=6)
    np.testing.assert_allclose(head.trace, full.trace[:5], rtol=1e-5, atol=1e-6)
    other = input_curvature(loss, params, images, labels, key=jax.random.key(4), num_probes=6)
    assert not np.allclose(other.trace, full.trace)


def test_average_over_checkpoints():
    loss, params, images, labels = _mlp_setup(n=5, dtype=jnp.float32)
    ckpts = [params, jax.tree_util.tree_map(lambda a: 0.5 * a, params),
             jax.tree_util.tree_map(lambda a: -a, params)]
    key = jax.random.key(5)
    got = curvature_over_checkpoints(loss, ckpts, images, labels, key=key, num_probes=4)
    each = [input_curvature(loss, p, images, labels, key=jax.random.fold_in(key, c),
                            num_probes=4) for c, p in enumerate(ckpts)]
    np.testing.assert_allclose(got.trace, np.mean([e.trace for e in each], 0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(
        got.stderr, np.sqrt(np.sum([np.square(e.stderr) for e in each], 0)) / 3, rtol=1e-5)


def test_bad_input_raises():
    loss, params, images, labels = _mlp_setup(n=4, dtype=jnp.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError):
        input_curvature(loss, params, images[:0], labels[:0], key=key)
    with pytest.raises(ValueError):
        input_curvature(loss, params, images, labels[:3], key=key)
    with pytest.raises(ValueError):
        input_curvature(loss, params, images.at[1, 0, 0].set(jnp.nan), labels, key=key)
    with pytest.raises(ValueError):
        input_curvature(loss, params, images.astype(jnp.int32), labels, key=key)
    with pytest.raises(ValueError):
        input_curvature(loss, params, images, labels, key=key, num_probes=1)
    with pytest.raises(ValueError):
        input_curvature(loss, params, images, labels, key=key, chunk_size=0)
    with pytest.raises(ValueError):
        curvature_over_checkpoints(loss, [], images, labels, key=key)
    with pytest.raises(ValueError):
        exact_input_hessian_trace(loss, params, images[:3], labels)
