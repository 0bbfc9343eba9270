"""DP-SGD accounting, samplers and the masked DP-SGD aggregation."""
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import pld, rdp

from gujax.dpsgd import dpsgd_aggregate, make_private
from gujax.noise import (CHOICES, PAIRED_BLOCK, SCHEDULES, Noise,
                         clipped_gaussian_sum_numpy, gaussian_noise, paired_normal)

NOISES = list(CHOICES)
from gujax.privacy import calibrate_noise_multiplier, dp_epsilon, dpsgd_event
from gujax.sampling import fixed_batch, poisson_batch, poisson_padded_size, shuffled_batch

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


# ---------------------------------------------------------------- accounting

@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_epsilon_matches_dp_accounting(accountant):
    sigma, q, steps, delta = 1.1, 0.02, 300, 1e-5
    acc = (rdp.RdpAccountant(neighboring_relation=ADD_REMOVE) if accountant == "rdp"
           else pld.PLDAccountant(neighboring_relation=ADD_REMOVE))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
    assert dp_epsilon(sigma, q, steps, delta, sampling="poisson",
                      accountant=accountant) == pytest.approx(
        acc.get_epsilon(delta), rel=1e-9)


def test_fixed_epsilon_matches_dp_accounting_with_replace_one_sensitivity():
    sigma, batch, n, steps, delta = 1.1, 20, 1000, 300, 1e-5
    acc = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    # Replace-one moves the clipped sum by up to 2C: multiplier sigma / 2.
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        n, batch, dp_accounting.GaussianDpEvent(sigma / 2)), steps)
    eps = dp_epsilon(sigma, batch / n, steps, delta, sampling="fixed")
    assert eps == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert eps > dp_epsilon(sigma, batch / n, steps, delta, sampling="poisson")  # replace-one costs more


def test_epsilon_decreases_with_noise_and_grows_with_steps():
    eps = [dp_epsilon(s, 0.01, 200, 1e-5, sampling="poisson") for s in (0.8, 1.0, 1.5)]
    assert eps[0] > eps[1] > eps[2]
    assert dp_epsilon(1.0, 0.01, 400, 1e-5, sampling="poisson") > eps[1]


@pytest.mark.parametrize("sampling,accountant", [
    ("poisson", "rdp"), ("poisson", "pld"), ("fixed", "rdp")])
def test_calibration_lands_within_one_percent(sampling, accountant):
    target, q, steps, delta = 3.0, 0.02, 200, 1e-5
    sigma = calibrate_noise_multiplier(target, q, steps, delta, sampling=sampling,
                                       accountant=accountant)
    eps = dp_epsilon(sigma, q, steps, delta, sampling=sampling, accountant=accountant)
    assert eps <= target * (1 + 1e-6)
    assert eps >= 0.99 * target
    # Slightly less noise overshoots the target: sigma is (nearly) the smallest.
    assert dp_epsilon(0.98 * sigma, q, steps, delta, sampling=sampling,
                      accountant=accountant) > target


def test_accounting_rejects_bad_input():
    with pytest.raises(ValueError, match="PLD"):
        dp_epsilon(1.0, 0.01, 10, 1e-5, sampling="fixed", accountant="pld")
    for args in [(0.0, 0.01, 10, 1e-5), (1.0, 0.0, 10, 1e-5), (1.0, 1.5, 10, 1e-5),
                 (1.0, 0.01, 0, 1e-5), (1.0, 0.01, 10, 0.0), (float("nan"), 0.01, 10, 1e-5)]:
        with pytest.raises(ValueError):
            dp_epsilon(*args, sampling="poisson")
    with pytest.raises(ValueError, match="sampling"):
        dp_epsilon(1.0, 0.01, 10, 1e-5, sampling="shuffle")
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(-1.0, 0.01, 10, 1e-5, sampling="poisson")


def test_the_sampling_must_be_named():
    """No silent default: an epsilon for Poisson sampling is wrong for a loop
    that draws fixed-size batches, so every entry point makes the caller
    name the sampler."""
    for call in (lambda: dp_epsilon(1.0, 0.01, 10, 1e-5),
                 lambda: calibrate_noise_multiplier(3.0, 0.01, 10, 1e-5),
                 lambda: dpsgd_event(1.0, 0.01, 10)):
        with pytest.raises(TypeError, match="sampling='poisson'.*make_private"):
            call()


# ------------------------------------------------- make_private: one object

def _reference_epsilon(sigma, n, batch, steps, delta, sampling, accountant):
    """dp_accounting's epsilon for ``steps`` batches of the named sampler,
    with the events composed by hand."""
    gaussian = dp_accounting.GaussianDpEvent
    if sampling == "poisson":
        acc = (rdp.RdpAccountant(neighboring_relation=ADD_REMOVE) if accountant == "rdp"
               else pld.PLDAccountant(neighboring_relation=ADD_REMOVE))
        acc.compose(dp_accounting.PoissonSampledDpEvent(batch / n, gaussian(sigma)), steps)
    else:
        acc = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, batch, gaussian(sigma / 2)),
                    steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sampling,accountant", [
    ("poisson", "rdp"), ("poisson", "pld"), ("fixed", "rdp")])
def test_make_private_epsilon_is_dp_accountings_for_the_sampler_it_returns(sampling,
                                                                           accountant):
    n, batch, epochs, delta = 600, 30, 3, 1e-5
    private = make_private(num_examples=n, batch_size=batch, epochs=epochs, target_epsilon=2.0,
                           delta=delta, l2_norm_clip=0.5, seed=4, sampling=sampling,
                           accountant=accountant)
    assert private.steps == epochs * (n // batch) == 60 and private.sample_rate == batch / n
    want = _reference_epsilon(private.noise_multiplier, n, batch, private.steps, delta,
                              sampling, accountant)
    assert private.epsilon == pytest.approx(want, rel=1e-9)
    assert 0.99 * 2.0 <= private.epsilon <= 2.0 * (1 + 1e-6)
    assert private.epsilon_after(10) < private.epsilon
    # The batches are the named sampler's: Poisson sizes vary around q N
    # under a mask, fixed batches are B distinct ids.
    batches = list(private.batches())
    assert len(batches) == private.steps
    sizes = np.array([int(mask.sum()) for _, mask in batches])
    assert all(len(ids) == private.rows for ids, _ in batches)
    if sampling == "poisson":
        assert private.rows > batch and sizes.std() > 1
        assert abs(sizes.mean() - batch) < 5 * np.sqrt(batch / private.steps)
        np.testing.assert_array_equal(batches[7][0], poisson_batch(4, 7, n, batch / n,
                                                                   private.rows)[0])
    else:
        assert private.rows == batch and (sizes == batch).all()
        np.testing.assert_array_equal(batches[7][0], fixed_batch(4, 7, n, batch)[0])
    # The transformation adds the calibrated noise: std sigma C / batch.
    ids, mask = private.batch(0)
    g = {"w": jnp.zeros((len(ids), 20_000))}
    update, _ = private.tx.update(g, private.tx.init(None), mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.std(np.asarray(update["w"])),
                               private.noise_multiplier * 0.5 / batch, rtol=0.03)


def test_make_private_refuses_batches_its_accountant_does_not_cover():
    poisson = make_private(num_examples=500, batch_size=25, epochs=1, target_epsilon=4.0,
                           delta=1e-5, l2_norm_clip=1.0)
    fixed = make_private(num_examples=500, batch_size=25, epochs=1, target_epsilon=4.0,
                         delta=1e-5, l2_norm_clip=1.0, sampling="fixed")
    rows = lambda b: {"w": jnp.ones((b, 3))}
    all_real = lambda b: jnp.ones(b, bool)
    # What a README-style loop of fixed-size batches hands a Poisson-accounted
    # DP-SGD: no mask, or B rows with an all-true mask. Both refused, also
    # under jit (shapes are static).
    with pytest.raises(ValueError, match="Poisson sampling.*no mask"):
        poisson.tx.update(rows(25), poisson.tx.init(None))
    with pytest.raises(ValueError, match="padded to"):
        poisson.tx.update(rows(25), poisson.tx.init(None), mask=all_real(25))
    with pytest.raises(ValueError, match="padded to"):
        jax.jit(lambda g, m: poisson.tx.update(g, poisson.tx.init(None), mask=m))(
            rows(25), all_real(25))
    # A Poisson batch handed to the fixed-size accountant.
    ids, mask = poisson.batch(0)
    with pytest.raises(ValueError, match="fixed-size batches of 25"):
        fixed.tx.update(rows(len(ids)), fixed.tx.init(None), mask=jnp.asarray(mask))
    with pytest.raises(ValueError, match="padding rows"):
        fixed.tx.update(rows(25), fixed.tx.init(None), mask=jnp.arange(25) < 20)
    # Their own batches pass, also an overflowing (unpadded, longer) Poisson one.
    poisson.tx.update(rows(len(ids)), poisson.tx.init(None), mask=jnp.asarray(mask))
    poisson.tx.update(rows(poisson.rows + 3), poisson.tx.init(None),
                      mask=all_real(poisson.rows + 3))
    fixed.tx.update(rows(25), fixed.tx.init(None), mask=jnp.asarray(fixed.batch(0)[1]))
    with pytest.raises(ValueError, match="sampling"):
        make_private(num_examples=500, batch_size=25, epochs=1, target_epsilon=4.0,
                     delta=1e-5, l2_norm_clip=1.0, sampling="shuffle")
    with pytest.raises(ValueError, match="fixed by the accounting"):
        poisson.train_config(sampling="shuffle")


def test_make_private_in_the_trainer_accepts_its_own_sampling_only():
    """``train_config()`` draws the accounted batches; a shuffled trainer
    handed the same transformation is refused at the first step."""
    import flax.linen as nn
    from gujax.train import TrainConfig, train
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 4, 1, 1)).astype(np.float32)
    y = (x[:, 0, 0, 0] > 0).astype(np.int32)
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.Dense(2)(v.reshape(v.shape[:-3] + (-1,)))

    model = Flat()
    params = model.init(jax.random.key(0), x[:1])["params"]
    private = make_private(num_examples=n, batch_size=20, epochs=2, target_epsilon=8.0,
                           delta=1e-5, l2_norm_clip=1.0, seed=1)
    data = (x, y, np.arange(n))
    result = train(params=params, model=model, data=data, aggregator=private.tx,
                   config=private.train_config(learning_rate=0.5, progress=False))
    assert len(result.history) == 2 and result.history[-1]["step"] == private.steps
    with pytest.raises(ValueError, match="padded to"):
        train(params=params, model=model, data=data, aggregator=private.tx,
              config=TrainConfig(epochs=1, batch_size=20, sampling="shuffle", progress=False))


# ------------------------------------------------------------------ samplers

def test_poisson_sampler_rate_mask_and_determinism():
    n, q = 500, 0.05
    size = poisson_padded_size(n, q)
    counts = np.zeros(n)
    sizes = []
    for step in range(400):
        ids, mask = poisson_batch(7, step, n, q, size)
        assert ids.shape == mask.shape == (size,) and mask.dtype == bool
        real = ids[mask]
        assert len(np.unique(real)) == len(real)  # no example twice
        assert np.all(mask[:len(real)]) and not np.any(mask[len(real):])
        assert np.all(ids[~mask] == 0)
        counts[real] += 1
        sizes.append(len(real))
    rate = counts.sum() / (n * 400)
    # Binomial(200000, 0.05): standard error 4.9e-4.
    assert abs(rate - q) < 5 * np.sqrt(q * (1 - q) / (n * 400))
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.3)  # not fixed-size
    a, b = poisson_batch(7, 3, n, q, size), poisson_batch(7, 3, n, q, size)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], poisson_batch(8, 3, n, q, size)[0])


def test_poisson_padded_size_and_overflow_is_not_truncated():
    from scipy import stats
    n, q = 1000, 0.1
    size = poisson_padded_size(n, q, overflow_prob=1e-9)
    assert stats.binom.sf(size, n, q) <= 1e-9 < stats.binom.sf(size - 1, n, q)
    with pytest.warns(RuntimeWarning, match="not truncated"):
        ids, mask = poisson_batch(0, 0, n, q, padded_size=10)
    assert mask.all() and len(ids) > 10 and len(np.unique(ids)) == len(ids)


def test_fixed_and_shuffled_batches():
    ids, mask = fixed_batch(1, 5, 100, 30)
    assert ids.shape == (30,) and mask.all() and len(np.unique(ids)) == 30
    seen = np.concatenate([shuffled_batch(1, s, 103, 10)[0] for s in range(10)])
    assert len(np.unique(seen)) == 100  # one epoch: each at most once, 3 dropped
    with pytest.raises(ValueError):
        fixed_batch(0, 0, 10, 11)
    with pytest.raises(ValueError):
        poisson_batch(0, 0, 10, 0.0, 5)


# -------------------------------------------------------------------- DP-SGD

def test_dpsgd_without_noise_is_clipped_sum_over_expected_batch():
    rng = np.random.default_rng(0)
    g = {"w": jnp.asarray(rng.normal(size=(6, 4, 2)) * 3, jnp.float32)}
    g["w"] = g["w"].at[4].set(jnp.nan)  # non-finite row: contributes nothing
    mask = jnp.array([True, True, True, True, True, False])
    tx = dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=4.0,
                         seed=0)
    update, _ = jax.jit(lambda g, s, m: tx.update(g, s, None, example_ids=jnp.arange(6),
                                                  mask=m))(g, tx.init(None), mask)
    rows = np.asarray(g["w"], np.float64).reshape(6, -1)
    expected = np.zeros(8)
    for j in range(4):  # rows 0..3 real and finite
        expected += rows[j] * min(1.0, 1.0 / np.linalg.norm(rows[j]))
    np.testing.assert_allclose(np.asarray(update["w"]).ravel(), expected / 4, rtol=1e-5)


def test_dpsgd_noise_has_the_right_scale_and_is_seeded():
    g = {"w": jnp.zeros((8, 2000))}
    tx = dpsgd_aggregate(l2_norm_clip=2.0, noise_multiplier=1.5, expected_batch_size=5.0,
                         seed=3)
    step = jax.jit(lambda g, s: tx.update(g, s, None, example_ids=jnp.arange(8)))
    u1, s1 = step(g, tx.init(None))
    u2, _ = step(g, s1)
    np.testing.assert_allclose(np.std(np.asarray(u1["w"])), 2.0 * 1.5 / 5.0, rtol=0.05)
    assert not np.allclose(u1["w"], u2["w"])
    u1b, _ = step(g, tx.init(None))
    np.testing.assert_array_equal(u1["w"], u1b["w"])
    chained = optax.chain(tx, optax.sgd(0.1))
    chained.update(g, chained.init({"w": jnp.zeros(2000)}), example_ids=jnp.arange(8))


def test_dpsgd_rejects_bad_input():
    with pytest.raises(ValueError, match="l2_norm_clip"):
        dpsgd_aggregate(l2_norm_clip=0.0, noise_multiplier=1.0, expected_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=-1.0, expected_batch_size=4, seed=0)
    tx = dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=4, seed=0)
    with pytest.raises(ValueError, match="mask"):
        tx.update({"w": jnp.zeros((3, 2))}, tx.init(None), mask=jnp.ones(3))


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: f"{n.impl}-{n.schedule}")
def test_dpsgd_noise_is_gaussian_with_std_sigma_c_for_every_generator(noise):
    """The noise every DP-SGD path adds (gujax.noise.Noise.draw) is
    N(0, sigma^2 C^2) per coordinate, whichever key implementation and key
    schedule (per leaf or flat) draws it: moments, Kolmogorov-Smirnov and
    D'Agostino-Pearson tests on 2 x 10^5 coordinates at a fixed seed."""
    from scipy import stats
    sigma, clip = 1.5, 2.0
    g = {"w": jnp.zeros((4, 100_000)), "b": jnp.zeros((4, 100_000))}
    tx = dpsgd_aggregate(l2_norm_clip=clip, noise_multiplier=sigma, expected_batch_size=1.0,
                         seed=11, noise=noise)
    update, state = jax.jit(lambda g, s: tx.update(g, s))(g, tx.init(None))
    z = np.concatenate([np.asarray(update["w"]), np.asarray(update["b"])]) / (sigma * clip)
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert abs(z.std() - 1) < 0.01
    assert abs(stats.kurtosis(z)) < 0.05 and abs(stats.skew(z)) < 0.03
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert stats.normaltest(z).pvalue > 1e-4
    # Leaves get independent noise, and the next step other noise.
    assert abs(np.corrcoef(update["w"], update["b"])[0, 1]) < 0.02
    again, _ = tx.update(g, state)
    assert abs(np.corrcoef(update["w"], again["w"])[0, 1]) < 0.02
    assert abs(np.corrcoef(update["b"], again["b"])[0, 1]) < 0.02
    assert jax.random.key_impl(state.key) == jax.random.key_impl(noise.key(0))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_flat_noise_is_one_draw_cut_into_the_leaves(impl):
    """flat=True: next_key, k = split(key); the leaves, in tree order, are one
    normal(k, (P,)) cut back into their shapes. Another stream than the
    per-leaf schedule for the same key."""
    like = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5), "c": jnp.zeros((2, 1, 3))}
    key = jax.random.key(7, impl=impl)
    noise, next_key = gaussian_noise(key, like, 2.0, flat=True)
    _, k = jax.random.split(key)
    z = 2.0 * np.asarray(jax.random.normal(k, (23,)))
    leaves = jax.tree_util.tree_leaves(noise)
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in leaves]), z, rtol=1e-6)
    assert [x.shape for x in leaves] == [(3, 4), (5,), (2, 1, 3)]
    per_leaf, _ = gaussian_noise(key, like, 2.0)
    # (With JAX's partitionable threefry the first leaf can coincide: same
    # second key, and a draw's prefix is the smaller draw.)
    assert not np.allclose(noise["b"], per_leaf["b"])
    assert not np.allclose(noise["c"], per_leaf["c"])
    np.testing.assert_array_equal(jax.random.key_data(next_key),
                                  jax.random.key_data(jax.random.split(key)[0]))


@pytest.mark.parametrize("n", [1, 5, PAIRED_BLOCK - 1, PAIRED_BLOCK, 3 * PAIRED_BLOCK + 7])
def test_paired_noise_is_jaxs_non_partitionable_threefry_stream(n):
    """The paired draw reads both words of each threefry2x32 block: it is, bit
    for bit, jax.random.normal under jax_threefry_partitionable=False, of the
    count padded to PAIRED_BLOCK, cut to n."""
    key = jax.random.key(5)
    got = jax.jit(paired_normal, static_argnums=1)(key, n)
    padded = -(-n // PAIRED_BLOCK) * PAIRED_BLOCK
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        want = jax.random.normal(key, (padded,))[:n]
    finally:
        jax.config.update("jax_threefry_partitionable", previous)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    like = {"a": jnp.zeros((n,)), "b": jnp.zeros((2, 3))}
    noise, next_key = Noise(schedule="paired").draw(key, like, 2.0)
    _, k = jax.random.split(key)
    flat = 2.0 * paired_normal(k, n + 6)
    np.testing.assert_allclose(np.concatenate([np.ravel(noise["a"]), np.ravel(noise["b"])]),
                               flat, rtol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(next_key),
                                  jax.random.key_data(jax.random.split(key)[0]))


def test_another_noise_generator_is_another_stream_and_bad_names_are_refused():
    g = {"w": jnp.zeros((2, 1000))}
    draws = {}
    for impl in ("threefry2x32", "rbg"):
        tx = dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0,
                             seed=3, noise=Noise(impl))
        draws[impl] = np.asarray(tx.update(g, tx.init(None))[0]["w"])
    # Two leaves: the flat schedule's first leaf can coincide with threefry's.
    g2 = {"a": jnp.zeros((2, 10)), "w": jnp.zeros((2, 1000))}
    for schedule in SCHEDULES:
        tx = dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0,
                             seed=3, noise=Noise(schedule=schedule))
        draws[schedule] = np.asarray(tx.update(g2, tx.init(None))[0]["w"])
    assert not np.allclose(draws["threefry2x32"], draws["rbg"])
    assert not np.allclose(draws["per_leaf"], draws["flat"])
    assert not np.allclose(draws["flat"], draws["paired"])
    with pytest.raises(ValueError, match="impl"):
        Noise("philox")
    with pytest.raises(ValueError, match="schedule"):
        Noise(schedule="blocked")
    with pytest.raises(ValueError, match="'paired' reads threefry2x32 blocks"):
        Noise("rbg", "paired")
    with pytest.raises(ValueError, match="noise"):
        dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=1.0,
                        seed=3, noise="rbg")


def test_numpy_gaussian_mechanism_is_the_jax_one_in_distribution():
    """The host twin (``clipped_gaussian_sum_numpy``, the private feature
    standardiser's mechanism) and DP-SGD's clip + noise on the same rows:
    the same clipped sum to rounding, and noise of the same law (two-sample
    Kolmogorov-Smirnov and moments over 2 x 10^5 coordinates)."""
    from scipy import stats
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 200_000)) * np.array([[0.1], [3], [0.5], [10], [0], [1], [2]])
    clip, sigma = 1.5, 0.8
    exact = clipped_gaussian_sum_numpy(rows, clip, 0.0, np.random.default_rng(1))
    tx = dpsgd_aggregate(l2_norm_clip=clip, noise_multiplier=0.0, expected_batch_size=1.0,
                         seed=0)
    jax_sum = np.asarray(tx.update({"w": jnp.asarray(rows, jnp.float32)}, tx.init(None))[0]["w"])
    np.testing.assert_allclose(jax_sum, exact, rtol=1e-4, atol=1e-4)
    host = clipped_gaussian_sum_numpy(rows, clip, sigma, np.random.default_rng(2)) - exact
    tx = dpsgd_aggregate(l2_norm_clip=clip, noise_multiplier=sigma, expected_batch_size=1.0,
                         seed=2)
    device = np.asarray(tx.update({"w": jnp.zeros((1, 200_000))}, tx.init(None))[0]["w"])
    assert stats.ks_2samp(host, device).pvalue > 1e-3
    for z in (host, device):
        assert abs(z.std() / (sigma * clip) - 1) < 0.01 and abs(z.mean()) < 0.01
