"""ScatterNet features (gujax.features) against kymatio's numpy frontend, their
cache, the private standardisation against its definition, the scatter models
on the ghost path, and the DP accounting of the standardisation's releases."""
from __future__ import annotations

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gujax import features
from gujax.arms import Arm, TrainingRun, parse_arm, train_runs
from gujax.data import Dataset, model_inputs
from gujax.ghost.kernels import describe, ghost_gram
from gujax.grads import gram, per_example_grads
from gujax.models import ScatterCNN, ScatterLinear
from gujax.privacy import calibrate_noise_multiplier, dp_epsilon
from gujax.train import TrainConfig


def _images(n, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


def _dataset(images, seed=0):
    n = len(images)
    labels = np.random.default_rng(seed).integers(0, 10, n).astype(np.int32)
    return Dataset(images=images, labels=labels, ids=np.arange(n, dtype=np.int64),
                   class_names=tuple(str(c) for c in range(10)), name="tiny", split="train")


def test_num_coefficients_counts_the_paths():
    assert features.num_coefficients(2, 8) == 81        # 1 + 16 + 64
    assert features.num_coefficients(3, 4) == 1 + 12 + 16 * 3


def test_scattering_matches_kymatio_numpy_frontend():
    from kymatio.numpy import Scattering2D
    x = np.random.default_rng(1).normal(size=(5, 32, 32, 3)).astype(np.float32)
    ours = features.scattering(x, J=2, L=8, batch_size=3)   # a padded last batch too
    reference = Scattering2D(J=2, shape=(32, 32), L=8)(x.transpose(0, 3, 1, 2))
    assert ours.shape == (5, 3, 81, 8, 8) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_channels_last_layout_is_channel_times_k_plus_coefficient():
    coefficients = np.random.default_rng(0).normal(size=(2, 3, 81, 4, 4)).astype(np.float32)
    out = features.channels_last(coefficients)
    assert out.shape == (2, 4, 4, 243)
    np.testing.assert_array_equal(out[1, 2, 3, 81 * 2 + 5], coefficients[1, 2, 5, 2, 3])


def test_scattering_features_normalise_then_scatter_and_cache(tmp_path, monkeypatch):
    data = _dataset(_images(4))
    out = features.scattering_features(data, cache_dir=tmp_path, progress=False)
    x = (data.images / 255.0 - np.array(features.IMAGENET_MEAN)) / np.array(features.IMAGENET_STD)
    expected = features.channels_last(features.scattering(x.astype(np.float32)))
    np.testing.assert_allclose(out.images, expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())
    assert out.images.shape == (4, 4, 4, 243) and out.images.dtype == np.float32
    np.testing.assert_array_equal(out.labels, data.labels)
    np.testing.assert_array_equal(out.ids, data.ids)
    assert out.name == "tiny+scattering-J2-L8"
    # A second call reads the cache instead of scattering again ...
    monkeypatch.setattr(features, "scattering", lambda *a, **k: pytest.fail("recomputed"))
    again = features.scattering_features(data, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.images, out.images)
    # ... and other images miss it.
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        features.scattering_features(_dataset(_images(4, seed=5)), cache_dir=tmp_path,
                                     progress=False)


def test_scattering_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiples of 2"):
        features.scattering(np.zeros((1, 10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        features.scattering(np.zeros((10, 10, 3), np.float32))
    feats = Dataset(images=np.zeros((2, 4, 4, 6), np.float32), labels=np.zeros(2, np.int32),
                    ids=np.arange(2), class_names=("a",), name="f", split="train")
    with pytest.raises(ValueError, match="features already"):
        features.scattering_features(feats)
    with pytest.raises(ValueError, match="both mean and std"):
        features.scattering_features(_dataset(_images(2)), std=None)
    assert features.scattering(np.zeros((0, 8, 8, 1), np.float32)).shape == (0, 1, 81, 2, 2)


def test_dataset_holds_float32_features_and_model_inputs_keeps_them():
    x = np.random.default_rng(0).normal(size=(3, 2, 2, 5)).astype(np.float32)
    Dataset(images=x, labels=np.zeros(3, np.int32), ids=np.arange(3), class_names=("a",),
            name="f", split="train")
    with pytest.raises(ValueError, match="uint8 .pixels. or float32"):
        Dataset(images=x.astype(np.float64), labels=np.zeros(3, np.int32), ids=np.arange(3),
                class_names=("a",), name="f", split="train")
    np.testing.assert_array_equal(model_inputs(x), x)
    np.testing.assert_allclose(model_inputs(np.full((1, 1), 255, np.uint8)), [[1.0]])


# ----------------------------------------------------------------------------
# Private standardisation.

def _features(n=400, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 2, 2, 6)) * scale + np.arange(6)).astype(np.float32)
    x[:, :, :, 5] = 0.0                              # a dead channel
    return Dataset(images=x, labels=np.zeros(n, np.int32), ids=np.arange(n),
                   class_names=("a",), name="f", split="train")


def test_exact_standardizer_is_the_data_set_mean_and_variance():
    data = _features()
    st = features.private_standardizer(data, noise_multiplier=0, clip_mean=1, clip_square=1)
    x = data.images.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.var, x.var(0), rtol=1e-8, atol=1e-12)
    assert st.releases == ()
    out = st(data).images.reshape(-1, 6)
    np.testing.assert_allclose(out[:, :5].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, :5].std(0), 1, atol=1e-4)
    assert np.all(out[:, 5] == 0)                    # zero variance: set to 0, not inf


def test_private_standardizer_clips_then_adds_the_stated_noise():
    data = _features(n=50)
    x = data.images.reshape(50, 4, 6).astype(np.float64)
    first, second = x.mean(1), (x ** 2).mean(1)
    clip_mean, clip_square = 2.0, 20.0

    def clipped_mean(v, c):             # straight from the definition, row by row
        rows = [r * min(1.0, c / np.linalg.norm(r)) for r in v]
        return np.mean(rows, axis=0)

    sigma = 8.0
    runs = [features.private_standardizer(data, noise_multiplier=sigma, clip_mean=clip_mean,
                                          clip_square=clip_square, seed=s) for s in range(300)]
    means = np.array([r.mean for r in runs])
    # Unbiased around the clipped mean, with std sigma * clip / N per channel.
    np.testing.assert_allclose(means.mean(0), clipped_mean(first, clip_mean),
                               atol=4 * sigma * clip_mean / 50 / np.sqrt(300))
    np.testing.assert_allclose(means.std(0), sigma * clip_mean / 50, rtol=0.2)
    assert runs[0].releases == (sigma, sigma)
    again = features.private_standardizer(data, noise_multiplier=sigma, clip_mean=clip_mean,
                                          clip_square=clip_square, seed=0)
    np.testing.assert_array_equal(again.mean, runs[0].mean)      # deterministic per seed
    assert np.all(runs[0].var >= 0)
    del second


def test_moment_norms_and_bad_arguments():
    data = _features()
    m, s = features.moment_norms(data)
    x = data.images.reshape(len(data), 4, 6).astype(np.float64)
    assert m == pytest.approx(np.median(np.linalg.norm(x.mean(1), axis=1)))
    assert s == pytest.approx(np.median(np.linalg.norm((x ** 2).mean(1), axis=1)))
    with pytest.raises(ValueError, match="noise_multiplier"):
        features.private_standardizer(data, noise_multiplier=-1, clip_mean=1, clip_square=1)
    with pytest.raises(ValueError, match="clip_mean"):
        features.private_standardizer(data, noise_multiplier=1, clip_mean=0, clip_square=1)
    with pytest.raises(ValueError, match="float32 features"):
        features.moment_norms(_dataset(_images(2)))
    st = features.private_standardizer(data, noise_multiplier=0, clip_mean=1, clip_square=1)
    with pytest.raises(ValueError, match="6 channels"):
        st(Dataset(images=np.zeros((1, 2, 2, 3), np.float32), labels=np.zeros(1, np.int32),
                   ids=np.arange(1), class_names=("a",), name="f", split="train"))


def test_releases_compose_into_epsilon_like_dp_accounting():
    q, steps, delta = 0.1, 50, 1e-5
    # The reference: the events composed by hand.
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(8.0), dp_accounting.GaussianDpEvent(8.0),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.5)), steps)]))
    with_releases = dp_epsilon(1.5, q, steps, delta, sampling="poisson", releases=(8.0, 8.0))
    assert with_releases == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert with_releases > dp_epsilon(1.5, q, steps, delta, sampling="poisson")
    sigma = calibrate_noise_multiplier(2.0, q, steps, delta, sampling="poisson",
                                       releases=(8.0, 8.0))
    assert dp_epsilon(sigma, q, steps, delta, sampling="poisson", releases=(8.0, 8.0)) <= 2.0 + 1e-6
    assert sigma > calibrate_noise_multiplier(2.0, q, steps, delta, sampling="poisson")
    with pytest.raises(ValueError, match="alone spend"):
        calibrate_noise_multiplier(0.5, q, steps, delta, sampling="poisson",
                                   releases=(0.5,))
    with pytest.raises(ValueError, match="releases"):
        dp_epsilon(1.5, q, steps, delta, sampling="poisson", releases=(0.0,))


# ----------------------------------------------------------------------------
# Models on features, and the arm options they need.

def _classifier(model, x):
    params = model.init(jax.random.key(0), x[0])["params"]
    params = jax.tree_util.tree_map(lambda a: a.astype(x.dtype), params)
    batch = {"x": x, "y": jnp.arange(x.shape[0]) % 10}

    def loss(p, ex):
        return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]]

    return params, batch, loss


@pytest.mark.parametrize("model", [ScatterLinear(groups=9), ScatterLinear(groups=None),
                                   ScatterCNN(groups=9, width=8)], ids=["linear-gn",
                                                                        "linear", "cnn"])
def test_scatter_models_ghost_gram_matches_explicit_float64(model):
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4, 4, 27)) * 2 + 1)
        params, batch, loss = _classifier(model, x)
        ghost = jax.jit(ghost_gram, static_argnums=0)(loss, params, batch)
        explicit = gram(jax.jit(per_example_grads, static_argnums=0)(loss, params, batch))
        err = np.max(np.abs(np.asarray(ghost) - np.asarray(explicit))) / np.max(np.abs(explicit))
        assert err < 1e-10
        assert not describe(loss, params, batch)["fallback"]


def test_scatter_models_take_one_example_or_a_batch_and_check_groups():
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 243)).astype(np.float32)
    model = ScatterLinear()
    params = model.init(jax.random.key(0), x)["params"]
    assert params["Dense_0"]["kernel"].shape == (15552, 10)
    np.testing.assert_allclose(model.apply({"params": params}, x[1]),
                               model.apply({"params": params}, x)[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        ScatterLinear(groups=10).init(jax.random.key(0), x)


def test_arm_batch_and_ledger_options():
    arm = parse_arm("dpsgd:eps=3,batch=64,lr=2,ledger=false")
    assert arm.batch_size == 64 and arm.ledger is False and arm.name == "dpsgd eps=3 lr=2 B=64"
    # ledger= and releases= are DP-SGD's options: other kinds have none.
    with pytest.raises(ValueError, match="bad arm option 'ledger=false'"):
        parse_arm("censor:tau=2,ledger=false")
    with pytest.raises(ValueError, match="true or false"):
        parse_arm("dpsgd:eps=3,ledger=perhaps")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Arm("sgd", batch_size=0)
    with pytest.raises(ValueError, match="bad arm option.*releases"):
        Arm("sgd", releases=(8.0,))
    with pytest.raises(ValueError, match="noise multipliers"):
        Arm("dpsgd", epsilon=1.0, releases=(-1.0,))


def test_dpsgd_without_its_ledger_trains_the_same_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 2, 2, 9)).astype(np.float32)
    y = rng.integers(0, 10, 96).astype(np.int32)
    model = ScatterLinear(groups=None)
    params = model.init(jax.random.key(0), x[:1])["params"]
    results = []
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=0.5, progress=False)
    for ledger_on in (True, False):
        arm = Arm("dpsgd", epsilon=4.0, clip_norm=0.5, ledger=ledger_on, releases=(8.0, 8.0))
        (r,) = train_runs(arm, [TrainingRun((x, y, np.arange(96)), 3, params)], config,
                          model=model)
        results.append(r)
    with_ledger, without = results
    assert with_ledger.noise_multiplier == without.noise_multiplier
    assert with_ledger.epsilon <= 4.0 + 1e-6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           with_ledger.params, without.params)
    assert without.ledger is None
    assert with_ledger.ledger.disclosure.shape == (96,)


def test_shadow_models_of_a_dpsgd_arm_without_ledger_report_no_disclosure(tmp_path):
    from gujax.audit.shadow import audit_arm
    rng = np.random.default_rng(0)

    def split(n, name):
        return Dataset(images=rng.normal(size=(n, 2, 2, 9)).astype(np.float32),
                       labels=rng.integers(0, 10, n).astype(np.int32),
                       ids=np.arange(n, dtype=np.int64),
                       class_names=tuple(map(str, range(10))), name="f", split=name)

    record, audit = audit_arm(
        parse_arm("dpsgd:eps=4,ledger=false"), pool=split(60, "train"),
        population=split(20, "test"), model=ScatterLinear(groups=None),
        config=TrainConfig(epochs=1, batch_size=10, progress=False), num_models=3, seed=0,
        workdir=str(tmp_path), progress=False, augmentations=("identity",),
        models_at_once=3)
    assert np.all(np.isnan(record.disclosure)) and not record.retired.any()
    assert audit.disclosure_vs_vulnerability is None
    assert np.all(np.isfinite(record.epsilon)) and np.all(record.epsilon <= 4 + 1e-6)
    assert 0 <= audit.evaluations["lira_online"].auc <= 1
