"""Gradient inversion: analytic dense-layer recovery, optimisation, metrics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gujax.audit.reconstruction import (cosine_distance, infer_labels, invert_dense_gradient,
                                        invert_gradient, match_reconstructions, psnr, ssim,
                                        total_variation, two_layer_tensor_inversion,
                                        xent_gradient)


class MLP(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        hidden = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(self.num_classes, name="out")(hidden)


class Linear(nn.Module):
    num_classes: int = 4

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _setup(module, n, shape, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.uniform(size=(n, *shape)), dtype)
    labels = jnp.asarray(rng.integers(0, module.num_classes, size=n))
    params = module.init(jax.random.key(seed), images)["params"]
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return (lambda p, x: module.apply({"params": p}, x)), params, images, labels


# ------------------------------------------------------------------ analytic

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_example_is_recovered_exactly(seed):
    with jax.enable_x64(True):
        apply_fn, params, images, labels = _setup(MLP(), 1, (4, 4, 1), seed=seed)
        grads = xent_gradient(apply_fn, params, images, labels)
        x = invert_dense_gradient(grads["hidden"])
        assert x.shape == (16,)
        np.testing.assert_allclose(x, np.asarray(images).reshape(-1), rtol=1e-12, atol=1e-14)


def test_batch_gradient_gives_the_documented_mixture():
    with jax.enable_x64(True):
        apply_fn, params, images, labels = _setup(MLP(), 2, (4, 4, 1), seed=3)
        grads = xent_gradient(apply_fn, params, images, labels)
        got = np.asarray(invert_dense_gradient(grads["hidden"]))
        # delta_j per example, from the single-example gradients.
        deltas = np.stack([np.asarray(xent_gradient(apply_fn, params, images[j:j + 1],
                                                    labels[j:j + 1])["hidden"]["bias"])
                           for j in range(2)])
        unit = np.argmax(np.abs(deltas.mean(0)))
        flat = np.asarray(images).reshape(2, -1)
        want = (deltas[:, unit] @ flat) / deltas[:, unit].sum()
        np.testing.assert_allclose(got, want, rtol=1e-10)
        if np.all(deltas[:, unit] != 0):  # a true mixture, not either example
            assert not np.allclose(got, flat[0]) and not np.allclose(got, flat[1])


def test_invert_dense_gradient_rejects_bad_input():
    k, b = jnp.ones((4, 3)), jnp.ones(3)
    for bad in ({"kernel": k}, {"kernel": k, "bias": jnp.ones(2)},
                {"kernel": k, "bias": jnp.zeros(3)},
                {"kernel": k.at[0, 0].set(jnp.nan), "bias": b}, (k, b)):
        with pytest.raises(ValueError):
            invert_dense_gradient(bad)


@pytest.mark.parametrize("seed", range(4))
def test_infer_label_of_one_example_is_exact(seed):
    apply_fn, params, images, labels = _setup(MLP(num_classes=5), 1, (3, 3, 1), seed=seed,
                                              dtype=jnp.float32)
    grads = xent_gradient(apply_fn, params, images, labels)
    np.testing.assert_array_equal(infer_labels(grads["out"]["bias"]), labels)


def test_infer_labels_batch_at_initialisation():
    apply_fn, params, images, _ = _setup(MLP(num_classes=8), 3, (3, 3, 1), seed=0,
                                         dtype=jnp.float32)
    labels = jnp.asarray([5, 1, 6])
    grads = xent_gradient(apply_fn, params, images, labels)
    got = infer_labels(grads["out"]["bias"], num_examples=3)
    assert set(np.asarray(got).tolist()) == {1, 5, 6}


def test_infer_labels_rejects_bad_input():
    with pytest.raises(ValueError):
        infer_labels(jnp.ones((2, 2)))
    with pytest.raises(ValueError):
        infer_labels(jnp.ones(3), num_examples=4)
    with pytest.raises(ValueError):
        infer_labels(jnp.asarray([0.1, jnp.nan]))


# ------------------------------------------------------------ building blocks

def test_total_variation_matches_loops():
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 3))
    want = 0.0
    for img in x:
        dv = [abs(img[i + 1, j, c] - img[i, j, c]) for i in range(3) for j in range(5)
              for c in range(3)]
        dh = [abs(img[i, j + 1, c] - img[i, j, c]) for i in range(4) for j in range(4)
              for c in range(3)]
        want += np.mean(dv) + np.mean(dh)
    np.testing.assert_allclose(total_variation(jnp.asarray(x)), want / 2, rtol=1e-6)
    with pytest.raises(ValueError):
        total_variation(jnp.ones((4, 5, 3)))


def test_cosine_distance_matches_flat_vectors():
    rng = np.random.default_rng(1)
    a = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    b = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    fa = np.concatenate([a["b"], a["w"].ravel()])
    fb = np.concatenate([b["b"], b["w"].ravel()])
    want = 1 - fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)
    np.testing.assert_allclose(cosine_distance(a, b), want, rtol=1e-5)
    np.testing.assert_allclose(cosine_distance(a, a), 0.0, atol=1e-6)
    neg = jax.tree_util.tree_map(lambda v: -3 * v, a)
    np.testing.assert_allclose(cosine_distance(a, neg), 2.0, rtol=1e-6)


# ------------------------------------------------------------- optimisation

def test_inversion_recovers_softmax_regression_input():
    with jax.enable_x64(True):
        apply_fn, params, images, labels = _setup(Linear(), 1, (3, 3, 1), seed=4)
        target = xent_gradient(apply_fn, params, images, labels)
        known = infer_labels(target["Dense_0"]["bias"])
        np.testing.assert_array_equal(known, labels)
        res = invert_gradient(apply_fn, params, target, input_shape=(3, 3, 1),
                              num_examples=1, key=jax.random.key(0), labels=known,
                              num_steps=600, learning_rate=0.05)
        assert res.images.shape == (1, 3, 3, 1) and res.objective.shape == (600,)
        assert res.objective[-1] < 1e-3 * res.objective[0]
        quality = psnr(res.images, images)
        assert quality > 40, quality
        assert np.max(np.abs(np.asarray(res.images - images))) < 0.02


def test_joint_label_inversion_lowers_objective_and_is_deterministic():
    apply_fn, params, images, labels = _setup(MLP(num_classes=4), 2, (4, 4, 1), seed=5,
                                              dtype=jnp.float32)
    target = xent_gradient(apply_fn, params, images, labels)
    kwargs = dict(input_shape=(4, 4, 1), num_examples=2, key=jax.random.key(1),
                  num_steps=120, learning_rate=0.05, tv_weight=1e-2)
    res = invert_gradient(apply_fn, params, target, **kwargs)
    assert res.label_probs.shape == (2, 4)
    np.testing.assert_allclose(res.label_probs.sum(1), 1.0, rtol=1e-5)
    first, last = float(res.objective[:10].mean()), float(res.objective[-10:].mean())
    assert last < 0.5 * first, (first, last)
    # Same key, different progress granularity: same result.
    again = invert_gradient(apply_fn, params, target, steps_per_call=40, **kwargs)
    np.testing.assert_allclose(again.images, res.images, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.objective, res.objective, rtol=1e-5, atol=1e-6)


def test_invert_gradient_rejects_bad_input():
    apply_fn, params, images, labels = _setup(Linear(), 1, (3, 3, 1), dtype=jnp.float32)
    target = xent_gradient(apply_fn, params, images, labels)
    ok = dict(input_shape=(3, 3, 1), num_examples=1, key=jax.random.key(0), num_steps=2)
    zero = jax.tree_util.tree_map(jnp.zeros_like, target)
    nan = jax.tree_util.tree_map(lambda g: g.at[0].set(jnp.nan), target)
    cases = [
        dict(target_grads=zero),
        dict(target_grads=nan),
        dict(target_grads={"Dense_0": target["Dense_0"]["kernel"]}),
        dict(target_grads=target, labels=jnp.asarray([7])),
        dict(target_grads=target, labels=jnp.asarray([0, 1])),
        dict(target_grads=target, num_examples=0),
        dict(target_grads=target, tv_weight=-1.0),
        dict(target_grads=target, tv_weight=0.1, input_shape=(9,)),
        dict(target_grads=target, num_steps=0),
    ]
    for case in cases:
        kwargs = {**ok, **case}
        tg = kwargs.pop("target_grads")
        with pytest.raises(ValueError):
            invert_gradient(apply_fn, params, tg, **kwargs)


# ------------------------------------------------------------------ metrics

def test_psnr_known_cases():
    a = np.zeros((4, 4, 1))
    assert psnr(a + 0.1, a) == pytest.approx(20.0)           # MSE 0.01, range 1
    assert psnr(a + 0.01, a) == pytest.approx(40.0)
    assert psnr(a + 25.5, a, data_range=255) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")
    with pytest.raises(ValueError):
        psnr(a, np.zeros((4, 4)))
    with pytest.raises(ValueError):
        psnr(a, a, data_range=0)


def test_psnr_agrees_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")   # optional dependency
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=(8, 8, 3)), rng.uniform(size=(8, 8, 3))
    assert psnr(x, y) == pytest.approx(metrics.peak_signal_noise_ratio(y, x, data_range=1.0))


def test_ssim_cases():
    pytest.importorskip("skimage")                      # optional dependency
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(8, 8, 3))
    assert ssim(x, x) == pytest.approx(1.0)
    noisy = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
    assert ssim(noisy, x) < 0.9
    small = rng.uniform(size=(5, 5))
    assert ssim(small, small) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ssim(np.zeros((2, 2)), np.zeros((2, 2)))


def test_match_reconstructions_finds_the_permutation():
    rng = np.random.default_rng(2)
    originals = rng.uniform(size=(5, 6, 6, 1))
    perm = np.array([3, 0, 4, 1, 2])
    recs = originals[perm] + 0.01 * rng.normal(size=originals.shape)
    recs[1] = originals[perm[1]]                       # one exact copy: PSNR inf
    match = match_reconstructions(recs, originals)
    # reconstructions[order[i]] belongs to original i, i.e. perm[order[i]] == i.
    np.testing.assert_array_equal(perm[match.order], np.arange(5))
    want = [psnr(recs[match.order[i]], originals[i]) for i in range(5)]
    np.testing.assert_array_equal(match.psnr, want)
    assert np.isinf(match.psnr[perm[1]]) and np.all(match.psnr > 30)
    with pytest.raises(ValueError):
        match_reconstructions(recs[:3], originals)


# ------------------------------------------------- two-layer tensor method

class TwoLayer(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width, use_bias=False, name="hidden",
                     kernel_init=nn.initializers.normal(1.0))(x)
        out = nn.Dense(1, use_bias=False, name="out",
                       kernel_init=nn.initializers.normal(self.width ** -0.5))(jnp.tanh(h))
        return out[..., 0]


def _two_layer_query(d=8, b=2, width=4000, seed=0):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.uniform(size=(b, d)))
    ys = jnp.asarray(rng.normal(size=b))
    model = TwoLayer(width)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    model.init(jax.random.key(seed), xs)["params"])

    def loss(p):
        return 0.5 * jnp.mean((model.apply({"params": p}, xs) - ys) ** 2)
    grads = jax.grad(loss)(params)
    slopes = (model.apply({"params": params}, xs) - ys) / b     # dL/df_j
    return params, grads, np.asarray(xs), np.asarray(slopes)


def test_tensor_method_recovers_a_batch_from_one_gradient():
    with jax.enable_x64(True):
        params, grads, xs, slopes = _two_layer_query()
        res = two_layer_tensor_inversion(
            params["hidden"]["kernel"], grads["hidden"]["kernel"], params["out"]["kernel"],
            num_examples=2, activation=jnp.tanh, key=jax.random.key(0))
        match = match_reconstructions(res.inputs, xs)
        np.testing.assert_allclose(res.inputs[match.order], xs, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res.loss_slopes[match.order], slopes, rtol=1e-6)
        assert res.relative_residual < 1e-10
        # The tensor decomposition alone: right directions, Monte-Carlo error.
        rough = res.tensor_inputs[match_reconstructions(res.tensor_inputs, xs).order]
        cos = np.sum(rough * xs, 1) / np.linalg.norm(rough, axis=1) / np.linalg.norm(xs, axis=1)
        assert np.all(cos > 0.9), cos
        assert np.max(np.abs(rough - xs)) > 1e-6   # genuinely approximate before refinement


def test_tensor_method_rejects_bad_input():
    with jax.enable_x64(True):
        params, grads, _, _ = _two_layer_query(width=400)
        w, g, a = params["hidden"]["kernel"], grads["hidden"]["kernel"], params["out"]["kernel"]
        ok = dict(num_examples=2, activation=jnp.tanh, key=jax.random.key(0))
        cases = [
            (w, g, a, dict(num_examples=9)),                 # more examples than d = 8
            (w, g[:, :10], a, {}),                           # shape mismatch
            (w, g, a.at[3].set(0.0), {}),                    # zero output weight
            (0.1 * w, g, a, {}),                             # not a N(0, 1) query
            (w[:, :40], g[:, :40], a[:40], {}),              # too few units
            (w, g.at[0, 0].set(jnp.nan), a, {}),
        ]
        for wk, gk, ak, extra in cases:
            with pytest.raises(ValueError):
                two_layer_tensor_inversion(wk, gk, ak, **{**ok, **extra})
