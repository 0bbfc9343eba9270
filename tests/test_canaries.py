"""gujax.audit.canaries: canary sets, membership, insertion, training runs
with canaries, and the white-box dirac score against a per-canary loop."""
import dataclasses

import numpy as np
import pytest

from gujax.arms import parse_arm
from gujax.audit.canaries import (canary_membership, dirac_canaries, insert_canaries,
                                  make_canaries, mislabelled_canaries, ood_canaries,
                                  train_canary_runs)
from gujax.audit.epsilon import dirac_scores
from gujax.data import load, random_subset
from gujax.models import MLP
from gujax.train import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train")


def test_mislabelled_canaries_are_source_images_with_a_wrong_label(digits):
    c = mislabelled_canaries(digits, 200, seed=3, copies=2)
    assert len(c) == 200 and c.copies == 2 and c.name == "mislabel x2"
    by_id = {int(i): k for k, i in enumerate(digits.ids)}
    rows = np.array([by_id[int(i)] for i in c.source_ids])
    assert len(np.unique(rows)) == 200                         # distinct images
    np.testing.assert_array_equal(c.images, digits.images[rows])
    assert np.all(c.labels != digits.labels[rows])
    assert c.labels.min() >= 0 and c.labels.max() < 10
    # Every wrong label is used (uniform over the 9 wrong ones, not a fixed shift).
    assert len(np.unique((c.labels - digits.labels[rows]) % 10)) == 9
    again = mislabelled_canaries(digits, 200, seed=3, copies=2)
    np.testing.assert_array_equal(again.labels, c.labels)
    np.testing.assert_array_equal(again.source_ids, c.source_ids)
    assert not np.array_equal(mislabelled_canaries(digits, 200, seed=4).source_ids,
                              c.source_ids)


def test_ood_canaries():
    c = ood_canaries((8, 8, 1), 500, 10, seed=0)
    assert c.images.shape == (500, 8, 8, 1) and c.images.dtype == np.uint8
    assert c.images.min() < 10 and c.images.max() > 245     # spans the pixel range
    assert len(np.unique(c.labels)) == 10
    fixed = ood_canaries((8, 8, 1), 5, 10, seed=0, label=7)
    np.testing.assert_array_equal(fixed.labels, 7)
    with pytest.raises(ValueError, match="label"):
        ood_canaries((8, 8, 1), 5, 10, seed=0, label=10)
    with pytest.raises(ValueError, match="image_shape"):
        ood_canaries((8, 8), 5, 10, seed=0)


def test_dirac_canaries_light_the_least_used_pixels(digits):
    c = dirac_canaries(digits, 70, seed=0)
    flat = c.images.reshape(70, -1)
    assert np.all((flat > 0).sum(1) == 1)
    np.testing.assert_array_equal(flat.argmax(1), c.pixels)
    assert np.all(flat[np.arange(70), c.pixels] == 255)
    mean = digits.images.reshape(len(digits), -1).mean(0)
    # The first 64 are all pixels, least lit first; then the order repeats.
    np.testing.assert_array_equal(np.sort(mean[c.pixels[:64]]), mean[c.pixels[:64]])
    assert len(np.unique(c.pixels[:64])) == 64
    np.testing.assert_array_equal(c.pixels[64:], c.pixels[:6])
    assert mean[c.pixels[0]] == mean.min()


def test_make_canaries_and_errors(digits):
    assert make_canaries("ood", source=digits, num=4, seed=0).kind == "ood"
    with pytest.raises(ValueError, match="kind"):
        make_canaries("noise", source=digits, num=4, seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        mislabelled_canaries(random_subset(digits, 10, 0), 11, seed=0)
    with pytest.raises(ValueError, match="copies"):
        mislabelled_canaries(digits, 4, seed=0, copies=0)
    with pytest.raises(ValueError, match="num"):
        mislabelled_canaries(digits, 0, seed=0)


def test_membership_is_independent_fair_coins():
    mask = canary_membership(400, 50, seed=5)
    assert mask.shape == (50, 400) and mask.dtype == bool
    np.testing.assert_array_equal(mask, canary_membership(400, 50, seed=5))
    # Fair: the in-fraction within 4 standard errors of 1/2.
    assert abs(mask.mean() - 0.5) < 4 * 0.5 / np.sqrt(mask.size)
    # Not a balanced design: the per-canary counts vary like Binomial(50, 1/2).
    counts = mask.sum(0)
    assert counts.std() > 0.5 * np.sqrt(50 * 0.25) and len(np.unique(counts)) > 5
    assert not np.array_equal(mask, canary_membership(400, 50, seed=6))


def test_insert_canaries_adds_k_distinct_identical_rows_per_included_canary(digits):
    c = mislabelled_canaries(digits, 6, seed=0, copies=3)
    base_images, base_labels = digits.images[:20], digits.labels[:20]
    is_in = np.array([1, 0, 1, 1, 0, 0], bool)
    images, labels, owner = insert_canaries(base_images, base_labels, c, is_in)
    assert len(images) == len(labels) == len(owner) == 20 + 3 * 3
    np.testing.assert_array_equal(images[:20], base_images)
    np.testing.assert_array_equal(owner[:20], -1)
    for j in range(6):
        rows = np.flatnonzero(owner == j)
        assert len(rows) == (3 if is_in[j] else 0)
        for r in rows:
            np.testing.assert_array_equal(images[r], c.images[j])
            assert labels[r] == c.labels[j]
    with pytest.raises(ValueError, match="is_in"):
        insert_canaries(base_images, base_labels, c, is_in[:5])
    with pytest.raises(ValueError, match="match"):
        insert_canaries(base_images[:, :4], base_labels, c, is_in)


def test_runs_of_different_sizes_train_together_as_alone(digits):
    """The ledgers of runs holding different numbers of canary rows are sized
    to the largest run; a run trained in such a group is the run trained
    alone, and its ledger covers its own rows (duplicates each their own)."""
    c = mislabelled_canaries(digits, 8, seed=1, copies=2)
    base = random_subset(digits, 48, seed=0)
    masks = canary_membership(8, 2, seed=2)
    sets = [insert_canaries(base.images, base.labels, c, m)[:2] for m in masks]
    assert len(sets[0][1]) != len(sets[1][1])
    model, config = MLP(hidden=(16,)), TrainConfig(epochs=2, batch_size=16, learning_rate=0.2,
                                                    progress=False, eval_every=2)
    arm = parse_arm("censor:tau=0.5")
    together = train_canary_runs(arm, model=model, config=config, sets=sets, seeds=[3, 4])
    alone = train_canary_runs(arm, model=model, config=config, sets=sets[1:], seeds=[4])
    import jax
    for a, b in zip(jax.tree.leaves(together[1].params), jax.tree.leaves(alone[0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for run, (_, labels) in zip(together, sets):
        assert run.disclosure.shape == run.retired.shape == (len(labels),)
    assert together[0].retired.any()              # tau = 0.5 nats retires some rows
    with pytest.raises(ValueError, match="seed"):
        train_canary_runs(arm, model=model, config=config, sets=sets, seeds=[3])


def test_dirac_scores_against_a_loop_over_canaries(digits):
    import jax
    import jax.numpy as jnp
    model = MLP(hidden=(8,))
    c = dirac_canaries(digits, 5, seed=0)
    x = jnp.asarray(c.images, jnp.float32) / 255
    p0 = model.init(jax.random.key(0), x[:1])["params"]
    p1 = jax.tree.map(lambda a, k: a + 0.1 * jax.random.normal(k, a.shape), p0,
                      jax.tree.unflatten(jax.tree.structure(p0),
                                         list(jax.random.split(jax.random.key(1),
                                                               len(jax.tree.leaves(p0))))))
    got = dirac_scores(model, [p0], [p1], c)
    want = []
    for j in range(5):
        def loss(p):
            return -jax.nn.log_softmax(model.apply({"params": p}, x[j]))[c.labels[j]]
        g = -np.asarray(jax.grad(loss)(p0)["Dense_0"]["kernel"], np.float64)[c.pixels[j]]
        d = np.asarray(p1["Dense_0"]["kernel"] - p0["Dense_0"]["kernel"],
                       np.float64)[c.pixels[j]]
        want.append(g @ d / (np.linalg.norm(g) * np.linalg.norm(d)))
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="dirac"):
        dirac_scores(model, [p0], [p1], mislabelled_canaries(digits, 3, seed=0))


def test_canaries_of_featurised_data_train_as_features(digits):
    """Float features (the ScatterNet layout): mislabelled canaries keep the
    source's float32 rows, insertion checks the dtype, pixel kinds refuse."""
    features = dataclasses.replace(digits, images=(digits.images / 16.0).astype(np.float32))
    base, source = random_subset(features, 100, seed=0), random_subset(features, 40, seed=1)
    c = make_canaries("mislabel", source=source, num=8, seed=0, copies=2)
    assert c.images.dtype == np.float32
    images, labels, rows = insert_canaries(base.images, base.labels, c, np.arange(8) < 3)
    assert images.dtype == np.float32 and len(images) == 106 and (rows >= 0).sum() == 6
    with pytest.raises(ValueError, match="do not match"):
        insert_canaries(digits.images[:100], digits.labels[:100], c, np.arange(8) < 3)
    for kind in ("ood", "dirac"):
        with pytest.raises(ValueError, match="featurised"):
            make_canaries(kind, source=source, num=8, seed=0)
    config = TrainConfig(epochs=1, batch_size=32, learning_rate=0.1, progress=False)
    run, = train_canary_runs(parse_arm("censor:tau=8"), model=MLP(hidden=(16,)),
                             config=config, sets=[(images, labels)], seeds=[0])
    assert run.disclosure.shape == (106,) and np.all(np.isfinite(run.disclosure))
