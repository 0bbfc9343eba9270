"""Unique-feature insertion, feature KL and the memorisation score."""
import math
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gujax.audit.unique_features import (feature_kl, insert_patch, memorisation_score,
                                         stamp_text, text_mask)


# ---------------------------------------------------------------- insertion

@pytest.mark.parametrize("dtype,ink", [(np.uint8, 255), (np.float32, 1.0)])
def test_insert_patch_sets_exactly_the_patch(dtype, ink):
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 100, size=(10, 12, 3)) if dtype == np.uint8
             else rng.uniform(0, 0.4, size=(10, 12, 3))).astype(dtype)
    patch = np.full((3, 2), ink, dtype)
    out = insert_patch(image, patch, (4, 7))
    assert out.dtype == image.dtype and out.shape == image.shape
    changed = np.any(out != image, axis=-1)
    want = np.zeros((10, 12), bool)
    want[4:7, 7:9] = True
    np.testing.assert_array_equal(changed, want)
    np.testing.assert_array_equal(out[4:7, 7:9], ink)
    np.testing.assert_array_equal(image[0, 0], image[0, 0])  # input untouched
    assert not np.any(image[4:7, 7:9] == ink)


def test_insert_patch_batch_and_per_channel_patch():
    images = np.zeros((5, 6, 6, 3), np.float32)
    patch = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 12
    out = insert_patch(images, patch, (0, 4))
    for img in out:
        np.testing.assert_array_equal(img[0:2, 4:6], patch)
        assert np.count_nonzero(img) == np.count_nonzero(patch)


@pytest.mark.parametrize("image,patch,pos", [
    (np.zeros((8, 8, 1), np.uint8), np.full((2, 2), 300), (0, 0)),     # out of uint8 range
    (np.zeros((8, 8, 1), np.uint8), np.full((2, 2), 0.5), (0, 0)),     # non-integer for uint8
    (np.zeros((8, 8, 1), np.float32), np.ones((3, 3)), (6, 0)),        # does not fit
    (np.zeros((8, 8, 1), np.float32), np.ones((3, 3)), (-1, 0)),       # negative
    (np.zeros((8, 8, 3), np.float32), np.ones((3, 3, 2)), (0, 0)),     # channel mismatch
    (np.zeros((8, 8), np.float32), np.ones((3, 3)), (0, 0)),           # no channel axis
    (np.full((8, 8, 1), np.nan, np.float32), np.ones((3, 3)), (0, 0)),  # NaN image
])
def test_insert_patch_rejects_bad_input(image, patch, pos):
    with pytest.raises(ValueError):
        insert_patch(image, patch, pos)


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_stamp_text_is_deterministic_and_only_touches_glyphs(dtype):
    image = np.zeros((2, 16, 40, 3), dtype)
    out = stamp_text(image, "Ann", position=(2, 3))
    again = stamp_text(image, "Ann", position=(2, 3))
    np.testing.assert_array_equal(out, again)
    mask = text_mask("Ann", (16, 40), (2, 3))
    assert 10 < mask.sum() < 16 * 40 // 2
    ink = 255 if dtype == np.uint8 else 1.0
    for img in out:
        np.testing.assert_array_equal(img[mask], ink)
        np.testing.assert_array_equal(img[~mask], 0)
    # The glyphs start at the anchor: nothing above or left of it.
    assert not mask[:2].any() and not mask[:, :3].any()
    assert not np.array_equal(mask, text_mask("Bob", (16, 40), (2, 3)))


def test_stamp_text_custom_value_and_rejections():
    image = np.zeros((12, 30, 3), np.uint8)
    out = stamp_text(image, "Jo", value=[10, 20, 30])
    mask = text_mask("Jo", (12, 30))
    np.testing.assert_array_equal(out[mask], np.broadcast_to([10, 20, 30], (mask.sum(), 3)))
    with pytest.raises(ValueError):
        stamp_text(image, "")
    with pytest.raises(ValueError):
        stamp_text(image, "a very long name that cannot fit")
    with pytest.raises(ValueError):
        stamp_text(image, "Jo", position=(11, 0))
    with pytest.raises(ValueError):
        stamp_text(image, "Jo", value=256)


# ---------------------------------------------------------------- feature KL

class MLP(nn.Module):
    num_classes: int = 4

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(32)(x)))


def _apply(p, x):
    return MLP().apply({"params": p}, x)


def test_feature_kl_matches_float64_definition():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(6, 5, 5, 1)).astype(np.float32)
    xf = insert_patch(x, np.ones((2, 2)), (1, 1))
    params = MLP().init(jax.random.key(0), x)["params"]
    got = np.asarray(feature_kl(_apply, params, x, xf))

    def probs(images):
        logits = np.asarray(_apply(params, images), np.float64)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p, q = probs(x), probs(xf)
    want = np.array([sum(qi[k] * math.log(qi[k] / pi[k]) for k in range(4))
                     for pi, qi in zip(p, q)])
    assert got.shape == (6,)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_feature_kl_is_zero_for_identical_inputs():
    x = np.random.default_rng(2).uniform(size=(4, 5, 5, 1)).astype(np.float32)
    params = MLP().init(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(feature_kl(_apply, params, x, x.copy()), 0.0)


def test_feature_kl_rejects_bad_input():
    x = np.zeros((3, 5, 5, 1), np.float32)
    params = MLP().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError):
        feature_kl(_apply, params, x, x[:2])
    with pytest.raises(ValueError):
        feature_kl(_apply, params, x[:0], x[:0])
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        feature_kl(_apply, params, x, bad)
    with pytest.raises(ValueError):  # apply_fn returning one logit vector, not (N, K)
        feature_kl(lambda p, im: _apply(p, im)[0], params, x, x)


# ---------------------------------------------------------------- score

def test_memorisation_score_matches_definition():
    rng = np.random.default_rng(3)
    refs = rng.uniform(0, 0.1, size=(5, 7))
    target = rng.uniform(0, 0.3, size=7)
    got = memorisation_score(target, refs)
    ref_means = [statistics.fmean(r) for r in refs]
    t = statistics.fmean(target)
    assert got["target_mean_kl"] == pytest.approx(t)
    assert got["reference_mean_kl"] == pytest.approx(statistics.fmean(ref_means))
    assert got["reference_std_kl"] == pytest.approx(statistics.stdev(ref_means))
    assert got["z_score"] == pytest.approx(
        (t - statistics.fmean(ref_means)) / statistics.stdev(ref_means))
    assert got["ratio"] == pytest.approx(t / statistics.fmean(ref_means))
    assert got["p_value"] == pytest.approx((1 + sum(m >= t for m in ref_means)) / 6)
    assert (got["num_reference"], got["num_images"]) == (5, 7)


def test_memorisation_score_of_a_reference_like_target_is_zero():
    refs = np.random.default_rng(4).uniform(size=(4, 3))
    got = memorisation_score(refs.mean(0), refs)
    assert got["z_score"] == pytest.approx(0.0, abs=1e-12)
    assert got["ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("target,refs", [
    (np.ones(3), np.ones((1, 3))),           # one reference: no spread
    (np.ones(3), np.ones((4, 2))),           # mismatched number of images
    (np.ones(0), np.ones((4, 0))),           # empty
    (np.array([1.0, np.nan, 1]), np.ones((4, 3))),
    (np.array([1.0, -1, 1]), np.ones((4, 3))),
])
def test_memorisation_score_rejects_bad_input(target, refs):
    with pytest.raises(ValueError):
        memorisation_score(target, refs)


# ------------------------------------------- planted feature, tiny overfit MLP

def _train(images, labels, seed, steps=300):
    params = MLP().init(jax.random.key(seed), images)["params"]
    opt = optax.adam(1e-2)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(_apply(p, images), labels).mean()

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, steps))(params)
    return params


def test_planted_feature_is_memorised_and_scored():
    rng = np.random.default_rng(0)
    n, shape = 24, (8, 8, 1)
    # Training images: mid-grey with mild noise, so the patch is the one
    # distinctive thing about the planted image.
    images = (0.5 + 0.1 * rng.normal(size=(n, *shape))).astype(np.float32)
    labels = rng.integers(0, 3, size=n)           # classes 0..2
    patch = np.indices((3, 3)).sum(0) % 2          # 3x3 checkerboard
    planted = images.copy()
    planted[0] = insert_patch(images[0], patch, (0, 0))
    planted_labels = labels.copy()
    planted_labels[0] = 3                          # the one image with class 3

    target = _train(planted, jnp.asarray(planted_labels), seed=0)
    # Reference models: same data and labels, the image without its patch.
    references = [_train(images, jnp.asarray(planted_labels), seed=s) for s in (1, 2, 3, 4)]

    # Out-of-distribution images: darker, and uniform rather than Gaussian.
    ood = (0.3 * rng.uniform(size=(16, *shape))).astype(np.float32)
    ood_with = insert_patch(ood, patch, (0, 0))

    target_kl = feature_kl(_apply, target, ood, ood_with)
    ref_kls = np.stack([feature_kl(_apply, p, ood, ood_with) for p in references])
    score = memorisation_score(target_kl, ref_kls)
    # The target model moves its prediction towards the planted label.
    p_with = jax.nn.softmax(_apply(target, ood_with))[:, 3]
    p_without = jax.nn.softmax(_apply(target, ood))[:, 3]
    assert float(jnp.mean(p_with - p_without)) > 0.1
    assert score["z_score"] > 3, score
    assert score["ratio"] > 1.5, score
    assert score["p_value"] == pytest.approx(1 / 5)
    # The target compared with copies of itself scores zero.
    self_score = memorisation_score(target_kl, np.stack([target_kl, target_kl]))
    assert self_score["z_score"] == 0 and self_score["ratio"] == pytest.approx(1.0)
