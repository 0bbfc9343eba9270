"""Membership-inference attacks: naive references and synthetic IN/OUT shifts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gujax.audit.attacks import (evaluate_attack, lira_offline, lira_online,
                                 logit_scaled_confidence, loss_scores, rmia)


def _naive_phi(logits, labels):
    """log(p_y / (1 - p_y)) straight from the softmax, float64."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_y = np.take_along_axis(p, np.asarray(labels)[..., None], -1)[..., 0]
    return np.log(p_y / (1 - p_y))


def _null_auc_se(num_examples):
    """Standard error of an AUC of 0.5 with N/2 members and N/2 non-members.

    The pooled AUC averages M targets on the same N examples; counting only
    the N examples as independent makes this an upper bound on its spread.
    """
    n1 = n0 = num_examples / 2
    return np.sqrt((n1 + n0 + 1) / (12 * n1 * n0))


def _auc_se(value, num_examples):
    """Hanley & McNeil (1982) standard error of an AUC, N/2 per class."""
    n1 = n0 = num_examples / 2
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    return np.sqrt((value * (1 - value) + (n1 - 1) * (q1 - value**2)
                    + (n0 - 1) * (q2 - value**2)) / (n1 * n0))


def _shadow_data(num_models, num_examples, shift, num_aug=1, seed=0, noise=None,
                 balanced=True):
    """phi = mu_j + shift * IN + N(0, noise_j^2).

    balanced: every example IN in exactly M/2 models (else each model takes
    each example independently with probability 1/2). Per-example means mu_j
    spread widely (sd 3), so a global threshold on phi alone (no per-example
    calibration) would be weak.
    """
    rng = np.random.default_rng(seed)
    if balanced:
        in_mask = np.argsort(rng.random((num_models, num_examples)), axis=0) < num_models // 2
    else:
        in_mask = rng.random((num_models, num_examples)) < 0.5
    mu = 3.0 * rng.normal(size=(num_examples, 1))
    noise = np.ones((num_examples, 1)) if noise is None else noise[:, None]
    phi = (mu + shift * in_mask[..., None]
           + noise * rng.normal(size=(num_models, num_examples, num_aug)))
    return phi, in_mask


# ---------------------------------------------------------------- statistics


def test_logit_scaled_confidence_matches_naive_float64():
    rng = np.random.default_rng(0)
    logits = 3 * rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    with jax.enable_x64(True):
        phi = logit_scaled_confidence(jnp.asarray(logits, jnp.float64), labels)
        assert phi.dtype == jnp.float64
        np.testing.assert_allclose(phi, _naive_phi(logits, labels), rtol=1e-12, atol=1e-12)
    phi32 = logit_scaled_confidence(logits.astype(np.float32), labels)
    np.testing.assert_allclose(phi32, _naive_phi(logits, labels), rtol=1e-5, atol=1e-5)


def test_logit_scaled_confidence_finite_for_extreme_logits():
    # p_y rounds to exactly 1 or 0 in float64 here; the naive formula gives inf.
    logits = np.array([[1000.0, -1000.0, 0.0]] * 3, np.float32)
    phi = logit_scaled_confidence(logits, np.array([0, 1, 2]))
    # phi = z_y - logsumexp(others), exact here.
    np.testing.assert_allclose(phi, [1000.0, -2000.0, -1000.0])
    two_class = np.array([[60.0, -60.0], [-60.0, 60.0]], np.float32)
    np.testing.assert_allclose(logit_scaled_confidence(two_class, np.array([0, 0])),
                               [120.0, -120.0])
    with np.errstate(divide="ignore"):
        assert not np.all(np.isfinite(_naive_phi(two_class, np.array([0, 0]))))


def test_logit_scaled_confidence_with_augmentation_axis():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 2, 4))       # (M, N, A, C)
    labels = rng.integers(0, 4, size=5)
    phi = logit_scaled_confidence(logits.astype(np.float32), labels[:, None])
    assert phi.shape == (3, 5, 2)
    expected = _naive_phi(logits, np.broadcast_to(labels[:, None], (3, 5, 2)))
    np.testing.assert_allclose(phi, expected, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(logit_scaled_confidence)(logits.astype(np.float32), labels[:, None])
    np.testing.assert_allclose(jitted, phi, rtol=1e-6, atol=1e-6)


def test_loss_scores_are_minus_cross_entropy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6, 3))
    labels = rng.integers(0, 3, size=6)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.log(np.take_along_axis(p, np.broadcast_to(labels, (4, 6))[..., None], -1)[..., 0])
    np.testing.assert_allclose(loss_scores(logits.astype(np.float32), labels), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [logit_scaled_confidence, loss_scores])
def test_statistics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="C >= 2"):
        fn(np.zeros((3, 1)), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fn(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        fn(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="broadcast"):
        fn(np.zeros((2, 3)), np.array([0, 1, 2]))


# ---------------------------------------------------------------- LiRA: definition


def _naive_lira(phi, in_mask, online, global_variance):
    """Loops over targets and examples, straight from the definition."""
    num_models, num_examples, num_aug = phi.shape

    def groups(m, member):
        others = [k for k in range(num_models) if k != m]
        return [[phi[k, j] for k in others if in_mask[k, j] == member]
                for j in range(num_examples)]

    def pooled_var(group):
        dev = sum(((np.array(g) - np.mean(g, 0)) ** 2).sum(0) for g in group if len(g) > 1)
        dof = sum(len(g) - 1 for g in group if len(g) > 1)
        return dev / dof

    def fit(group, j):
        g = np.array(group[j])
        if len(g) == 0:
            return None
        if global_variance or len(g) < 2:
            var = pooled_var(group)
        else:
            var = np.var(g, 0, ddof=1)
            var = np.where(var > 0, var, pooled_var(group))
        return np.mean(g, 0), np.sqrt(var)

    scores = np.full((num_models, num_examples), np.nan)
    for m in range(num_models):
        group_in, group_out = groups(m, True), groups(m, False)
        for j in range(num_examples):
            out = fit(group_out, j)
            if online:
                inn = fit(group_in, j)
                if inn is None or out is None:
                    continue
                scores[m, j] = np.sum(stats.norm.logpdf(phi[m, j], *inn)
                                      - stats.norm.logpdf(phi[m, j], *out))
            elif out is not None:
                scores[m, j] = -np.sum(stats.norm.logsf(phi[m, j], *out))
    return scores


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("global_variance", [False, True])
def test_lira_matches_naive_loops(online, global_variance):
    rng = np.random.default_rng(3)
    num_models, num_examples, num_aug = 6, 30, 3
    in_mask = rng.random((num_models, num_examples)) < 0.5
    in_mask[:, 0] = [True, False, False, False, False, False]   # 0 or 1 IN shadow
    in_mask[:, 1] = [True, True, False, False, False, False]    # 1 or 2 IN shadows
    in_mask[:, 2] = True                                         # no OUT shadow
    phi = rng.normal(size=(num_models, num_examples, num_aug)) + 5 * rng.normal(size=(num_examples, 1))
    phi[:, 3, 0] = 1.5          # no spread: per-example variance falls back
    attack = lira_online if online else lira_offline
    result = attack(phi, in_mask, global_variance=global_variance)
    expected = _naive_lira(phi, in_mask, online, global_variance)
    np.testing.assert_array_equal(result.is_member, in_mask)
    np.testing.assert_array_equal(np.isnan(result.scores), np.isnan(expected))
    assert np.isnan(result.scores[:, 2]).all()
    if online:
        # Example 0's only IN model is model 0: no IN shadow when it is the target.
        assert np.isnan(result.scores[0, 0]) and not np.isnan(result.scores[1:, 0]).any()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- LiRA: behaviour


def test_lira_offline_global_recovers_gaussian_shift_auc():
    # IN ~ N(mu_j + delta, 1), OUT ~ N(mu_j, 1). With the OUT mean estimated
    # from n shadows, phi - mu_out ~ N(delta * IN, 1 + 1/n) with n = M/2 (target
    # IN) or M/2 - 1 (target OUT), and the offline score is monotone in it:
    # AUC = Phi(delta / sqrt(2 + 1/(M/2) + 1/(M/2 - 1))), -> Phi(delta/sqrt 2).
    num_models, num_examples, delta = 32, 4000, 1.0
    phi, in_mask = _shadow_data(num_models, num_examples, delta)
    half = num_models / 2
    expected = stats.norm.cdf(delta / np.sqrt(2 + 1 / half + 1 / (half - 1)))
    result = evaluate_attack(*lira_offline(phi, in_mask, global_variance=True))
    assert abs(result.auc - expected) < 3 * _auc_se(expected, num_examples)
    assert result.num_excluded == 0


def test_lira_online_global_recovers_gaussian_shift_auc():
    # With exact means and equal variances the log-likelihood ratio is linear
    # in phi - (mu_in + mu_out) / 2: AUC = Phi(delta / sqrt 2). Each mean is
    # estimated from about M/2 shadows; the allowance is the AUC lost if that
    # only added variance 4/M to the noise (a heuristic, small for M = 64).
    num_models, num_examples, delta = 64, 3000, 1.0
    phi, in_mask = _shadow_data(num_models, num_examples, delta, seed=1)
    ideal = stats.norm.cdf(delta / np.sqrt(2))
    allowance = ideal - stats.norm.cdf(delta / np.sqrt(2 * (1 + 4 / num_models)))
    result = evaluate_attack(*lira_online(phi, in_mask, global_variance=True))
    assert abs(result.auc - ideal) < 3 * _auc_se(ideal, num_examples) + allowance


@pytest.mark.parametrize("attack", [lira_online, lira_offline])
def test_lira_combines_augmented_queries(attack):
    # A = 4 independent queries with shift delta each carry the information of
    # one query with shift 2 delta: ideal AUC Phi(2 delta / sqrt 2) = 0.76
    # against Phi(delta / sqrt 2) = 0.64 for a single query.
    num_models, num_examples, delta = 64, 3000, 0.5
    phi, in_mask = _shadow_data(num_models, num_examples, delta, num_aug=4, seed=1)
    four = evaluate_attack(*attack(phi, in_mask, global_variance=True)).auc
    one = evaluate_attack(*attack(phi[..., :1], in_mask, global_variance=True)).auc
    ideal_four = stats.norm.cdf(2 * delta / np.sqrt(2))
    assert four > one + 0.05
    assert four < ideal_four + 3 * _auc_se(ideal_four, num_examples)


def test_lira_per_example_variance_helps_when_variances_differ():
    # Half the examples are precise (sd 0.2), half noisy (sd 3), same shift 0.5:
    # a global variance cannot tell the precise examples apart.
    num_examples = 2000
    noise = np.where(np.arange(num_examples) % 2 == 0, 0.2, 3.0)
    phi, in_mask = _shadow_data(32, num_examples, 0.5, seed=2, noise=noise)
    for attack in (lira_online, lira_offline):
        per_example = evaluate_attack(*attack(phi, in_mask))
        pooled = evaluate_attack(*attack(phi, in_mask, global_variance=True))
        assert per_example.tpr_at(0.01) > pooled.tpr_at(0.01) + 0.05
        # precise examples alone: Phi(0.5 / (0.2 sqrt 2)) = 0.96, noisy: 0.55
        assert per_example.auc > 0.7


@pytest.mark.parametrize("name", ["online", "online_global", "offline", "offline_global",
                                  "rmia", "rmia_offline", "loss"])
def test_attacks_are_at_chance_without_a_shift(name):
    # Independent masks: see test_online_lira_reads_shadow_counts_in_a_balanced_design.
    num_models, num_examples = 8, 4000
    phi, in_mask = _shadow_data(num_models, num_examples, 0.0, seed=4, balanced=False)
    prob = 1 / (1 + np.exp(-phi))                   # binary task: p_y = sigmoid(phi)
    population = 1 / (1 + np.exp(-_shadow_data(num_models, 500, 0.0, seed=5)[0]))
    scores = {
        "online": lambda: lira_online(phi, in_mask),
        "online_global": lambda: lira_online(phi, in_mask, global_variance=True),
        "offline": lambda: lira_offline(phi, in_mask),
        "offline_global": lambda: lira_offline(phi, in_mask, global_variance=True),
        "rmia": lambda: rmia(prob, in_mask, population),
        "rmia_offline": lambda: rmia(prob, in_mask, population, offline_a=0.5),
        "loss": lambda: (np.log(prob).mean(-1), in_mask),
    }[name]()
    result = evaluate_attack(*scores)
    assert abs(result.auc - 0.5) < 4 * _null_auc_se(num_examples)


def test_online_lira_reads_shadow_counts_in_a_balanced_design():
    # A known artefact, kept visible: when every example is IN in exactly M/2
    # models, leaving the target out leaves M/2 - 1 IN and M/2 OUT shadows if
    # the target trained on j, and the reverse otherwise. With few models the
    # Gaussian fitted to fewer shadows scores worse, so online LiRA "detects"
    # membership where phi carries none (AUC 0.65 at M = 4, 0.44 at M = 8).
    # Independent masks make the counts independent of the target's membership.
    num_models, num_examples = 4, 20000
    band = 4 * _null_auc_se(num_examples)
    balanced = _shadow_data(num_models, num_examples, 0.0, seed=9)
    independent = _shadow_data(num_models, num_examples, 0.0, seed=9, balanced=False)
    assert evaluate_attack(*lira_online(*balanced)).auc > 0.5 + 5 * band
    assert evaluate_attack(*lira_online(*balanced, global_variance=True)).auc < 0.5 - 5 * band
    for global_variance in (False, True):
        result = evaluate_attack(*lira_online(*independent, global_variance=global_variance))
        assert abs(result.auc - 0.5) < band
        result = evaluate_attack(*lira_offline(*balanced, global_variance=global_variance))
        assert abs(result.auc - 0.5) < band


def test_lira_rejects_bad_input():
    phi = np.zeros((4, 5, 2))
    mask = np.zeros((4, 5), bool)
    mask[:2] = True
    with pytest.raises(ValueError, match="in_mask must have shape"):
        lira_online(phi, mask[:, :4])
    with pytest.raises(ValueError, match="finite"):
        bad = phi.copy()
        bad[0, 0, 0] = np.nan
        lira_offline(bad, mask)
    with pytest.raises(ValueError, match="M >= 2"):
        lira_online(phi[:1], mask[:1])
    with pytest.raises(ValueError, match=r"\(M, N, A\)"):
        lira_online(np.zeros(5), mask)
    with pytest.raises(ValueError, match="two or more shadow"):
        lira_online(phi[:2], mask[:2] | np.array([[True], [False]]))


# ---------------------------------------------------------------- RMIA


def _naive_rmia(prob, in_mask, population, offline_a, gamma):
    num_models, num_examples = prob.shape
    scores = np.full(prob.shape, np.nan)
    for m in range(num_models):
        others = [k for k in range(num_models) if k != m]

        def reference(values, members):
            if offline_a is None:
                return np.mean([values[k] for k in others])
            out = [values[k] for k in others if not members[k]]
            if not out:
                return np.nan
            return 0.5 * ((1 + offline_a) * np.mean(out) + 1 - offline_a)

        ratio_z = [population[m, i] / reference(population[:, i], np.zeros(num_models, bool))
                   for i in range(population.shape[1])]
        for j in range(num_examples):
            ref = reference(prob[:, j], in_mask[:, j])
            if np.isnan(ref):
                continue
            ratio_x = prob[m, j] / ref
            scores[m, j] = np.mean([ratio_x / rz >= gamma for rz in ratio_z])
    return scores


@pytest.mark.parametrize("offline_a", [None, 0.3, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_rmia_matches_naive_loops(offline_a, gamma):
    rng = np.random.default_rng(6)
    num_models = 5
    prob = rng.random((num_models, 25, 2))          # averaged over the A = 2 axis
    population = rng.random((num_models, 40))
    in_mask = rng.random((num_models, 25)) < 0.5
    in_mask[:, 0] = True                            # no OUT reference model
    result = rmia(prob, in_mask, population, offline_a=offline_a, gamma=gamma)
    expected = _naive_rmia(prob.mean(-1), in_mask, population, offline_a, gamma)
    np.testing.assert_array_equal(np.isnan(result.scores), np.isnan(expected))
    np.testing.assert_allclose(result.scores, expected)


def test_rmia_detects_a_shift_with_few_models():
    # Four models only: every example has one or two OUT references.
    phi, in_mask = _shadow_data(4, 3000, 2.0, seed=7)
    population_phi = _shadow_data(4, 1000, 0.0, seed=8)[0]
    prob, population = 1 / (1 + np.exp(-phi)), 1 / (1 + np.exp(-population_phi))
    null_band = 4 * _null_auc_se(3000)
    for offline_a in (None, 0.5):
        result = evaluate_attack(*rmia(prob, in_mask, population, offline_a=offline_a))
        assert result.auc > 0.5 + 3 * null_band
    loss = evaluate_attack(np.log(prob).mean(-1), in_mask)
    # The reference models calibrate each example; the raw loss cannot.
    assert evaluate_attack(*rmia(prob, in_mask, population)).auc > loss.auc


def test_rmia_rejects_bad_input():
    prob = np.full((3, 4), 0.5)
    mask = np.zeros((3, 4), bool)
    with pytest.raises(ValueError, match="probabilities"):
        rmia(prob * 3, mask, prob)
    with pytest.raises(ValueError, match="M = 3 rows"):
        rmia(prob, mask, prob[:2])
    with pytest.raises(ValueError, match="offline_a"):
        rmia(prob, mask, prob, offline_a=1.5)
    with pytest.raises(ValueError, match="gamma"):
        rmia(prob, mask, prob, gamma=0.0)
    with pytest.raises(ValueError, match="in_mask must have shape"):
        rmia(prob, mask[:, :2], prob)
