"""Bootstrap intervals (gujax.audit.intervals): against a plain-loop
bootstrap from the definition, against jax-privacy's for one target, their
coverage on synthetic crossed problems whose truth is known, bad input, and
the verdicts read from intervals."""
import numpy as np
import pytest
from jax_privacy.auditing import BootstrapParams, CanaryScoreAuditor
from scipy import stats

from gujax.audit import metrics
from gujax.audit.attacks import evaluate_attack
from gujax.audit.intervals import (VERDICTS, attack_intervals, compare, crossed_resample,
                                   interval_order, mean_interval)


def _attack_case(seed, num_targets=8, num_examples=100, mu=0.5, target_sd=0.5,
                 example_sd=1.0):
    """Scores of a crossed attack: a member's score is shifted by
    mu + a_m + u_j (target and example effects), a non-member's is not, so
    every member/non-member comparison has the same law and the pooled AUC
    estimates Phi(mu / sqrt(target_sd^2 + example_sd^2 + 2)) without bias."""
    rng = np.random.default_rng(seed)
    member = rng.random((num_targets, num_examples)) < 0.5
    shift = (mu + rng.normal(0, target_sd, (num_targets, 1))
             + rng.normal(0, example_sd, (1, num_examples)))
    scores = member * shift + rng.normal(size=member.shape)
    truth = stats.norm.cdf(mu / np.sqrt(target_sd ** 2 + example_sd ** 2 + 2))
    return scores, member, truth


# ------------------------------------------------------------ the resampling


def test_crossed_resample_counts_and_seed():
    draws = crossed_resample(5, 7, num_resamples=40, seed=3)
    assert draws.targets.shape == (40, 5) and draws.examples.shape == (40, 7)
    np.testing.assert_array_equal(draws.targets.sum(1), 5)
    np.testing.assert_array_equal(draws.examples.sum(1), 7)
    again = crossed_resample(5, 7, num_resamples=40, seed=3)
    np.testing.assert_array_equal(draws.examples, again.examples)
    assert not np.array_equal(draws.examples,
                              crossed_resample(5, 7, num_resamples=40, seed=4).examples)
    # One target is not resampled: the bootstrap is then over examples alone.
    np.testing.assert_array_equal(crossed_resample(1, 7, num_resamples=9).targets, 1)


# ------------------------------------------------------- the naive reference


def _plain_loop_attack(scores, member, draws, levels, confidence):
    """Each resample written out pair by pair (pair (m, j) repeated
    targets[b, m] * examples[b, j] times), scored with gujax.audit.metrics."""
    aucs, tprs = [], []
    for t_counts, e_counts in zip(draws.targets, draws.examples):
        s, y = [], []
        for m in range(scores.shape[0]):
            for j in range(scores.shape[1]):
                if not np.isnan(scores[m, j]):
                    s += [scores[m, j]] * int(t_counts[m] * e_counts[j])
                    y += [member[m, j]] * int(t_counts[m] * e_counts[j])
        aucs.append(metrics.auc(np.array(s), np.array(y)))
        tprs.append(metrics.tpr_at_fpr(np.array(s), np.array(y), levels))
    tail = (1 - confidence) / 2
    return (np.quantile(aucs, [tail, 1 - tail]),
            np.quantile(np.array(tprs), [tail, 1 - tail], axis=0).T)


@pytest.mark.parametrize("tied", [False, True])
def test_attack_intervals_match_plain_loop(tied):
    rng = np.random.default_rng(1)
    member = rng.random((3, 40)) < 0.5
    scores = rng.normal(size=member.shape) + member
    if tied:  # few distinct values, shared by members and non-members
        scores = np.round(scores)
    scores[1, :4] = np.nan  # excluded pairs, as in evaluate_attack
    levels = (0.0, 0.05, 0.3)
    result = attack_intervals(scores, member, fpr_levels=levels, num_resamples=60, seed=5,
                              confidence=0.9)
    auc, tpr = _plain_loop_attack(scores, member, crossed_resample(3, 40, num_resamples=60,
                                                                   seed=5), levels, 0.9)
    np.testing.assert_allclose(result.auc, auc, rtol=1e-12)
    np.testing.assert_allclose(result.tpr_at_fpr, tpr, rtol=1e-12)
    np.testing.assert_array_equal(result.tpr_at(0.05), result.tpr_at_fpr[1])


def test_mean_interval_matches_plain_loop():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(4, 30))
    mask = rng.random((4, 30)) < 0.6
    draws = crossed_resample(4, 30, num_resamples=80, seed=7)
    means = []
    for t_counts, e_counts in zip(draws.targets, draws.examples):
        per_model = [np.repeat(values[m][mask[m]], e_counts[mask[m]]).mean() for m in range(4)]
        means.append(np.repeat(per_model, t_counts).mean())
    np.testing.assert_allclose(mean_interval(values, mask, num_resamples=80, seed=7),
                               np.quantile(means, [0.025, 0.975]), rtol=1e-12)


def test_single_target_auc_interval_agrees_with_jax_privacy():
    scores, member, _ = _attack_case(0, num_targets=1, num_examples=600)
    scores, member = scores[0], member[0]
    ours = attack_intervals(scores, member, num_resamples=2000).auc
    # jax-privacy's own AUROC is that of the ROC's Pareto frontier (attacks
    # that randomise between thresholds), higher than the empirical ROC's, so
    # its resampler is driven with our statistic. It resamples IN and OUT
    # separately, we the pairs: the same interval up to the Monte-Carlo
    # error of 2,000 resamples (~0.003 here).
    auditor = CanaryScoreAuditor(scores[member], scores[~member])

    def empirical_auc(resampled):
        inside, outside = resampled._in_canary_scores, resampled._out_canary_scores
        return metrics.auc(np.concatenate([inside, outside]),
                           np.arange(inside.size + outside.size) < inside.size)

    theirs = auditor._bootstrap(empirical_auc, BootstrapParams(
        num_samples=2000, bias_correction=False, seed=0))
    np.testing.assert_allclose(ours, theirs, atol=0.01)
    assert ours[1] - ours[0] > 0.05  # a real interval, not a point


def test_interval_brackets_the_estimate_and_depends_on_the_seed():
    scores, member, _ = _attack_case(3)
    evaluation = evaluate_attack(scores, member)
    first = attack_intervals(scores, member, num_resamples=300, seed=0)
    assert first.auc[0] < evaluation.auc < first.auc[1]
    for level in (1e-3, 1e-2):
        lo, hi = first.tpr_at(level)
        assert lo <= evaluation.tpr_at(level) <= hi
    again = attack_intervals(scores, member, num_resamples=300, seed=0)
    np.testing.assert_array_equal(first.tpr_at_fpr, again.tpr_at_fpr)
    assert not np.array_equal(first.auc, attack_intervals(scores, member, num_resamples=300,
                                                          seed=1).auc)


# ------------------------------------------------------------------ coverage


def _covers(interval, truth):
    return interval[0] <= truth <= interval[1]


def test_attack_interval_coverage_on_a_crossed_problem():
    """95% intervals of the pooled AUC cover the truth about 95% of the
    time; a bootstrap that treats the M x N pairs as independent (one target
    holding them all) covers far less, because the M scores of an example
    share its effect: the reason for the crossed bootstrap."""
    crossed, flat = [], []
    for rep in range(150):
        scores, member, truth = _attack_case(100 + rep)
        crossed.append(_covers(attack_intervals(scores, member, num_resamples=200,
                                                seed=rep).auc, truth))
        flat.append(_covers(attack_intervals(scores.ravel(), member.ravel(),
                                             num_resamples=200, seed=rep).auc, truth))
    assert 0.89 <= np.mean(crossed) <= 1.0, np.mean(crossed)
    assert np.mean(flat) < 0.8, np.mean(flat)


def test_accuracy_interval_coverage_on_a_crossed_problem():
    """Model m is right on example j with probability sigmoid(1 + a_m + u_j):
    the expected accuracy is E sigmoid(1 + s Z), s^2 = var a + var u."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    sd_model, sd_example = 0.4, 1.5
    truth = np.sum(weights * (1 / (1 + np.exp(-(1 + np.hypot(sd_model, sd_example) * nodes))))
                   ) / np.sqrt(2 * np.pi)
    covered, flat = [], []
    for rep in range(150):
        rng = np.random.default_rng(rep)
        logit = 1 + rng.normal(0, sd_model, (8, 1)) + rng.normal(0, sd_example, (1, 150))
        correct = rng.random(logit.shape) < 1 / (1 + np.exp(-logit))
        covered.append(_covers(mean_interval(correct, num_resamples=200, seed=rep), truth))
        flat.append(_covers(mean_interval(correct.ravel(), num_resamples=200, seed=rep), truth))
    assert 0.89 <= np.mean(covered) <= 1.0, np.mean(covered)
    assert np.mean(flat) < 0.8, np.mean(flat)  # the M x N results as independent


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("scores, member, match", [
    (np.zeros((2, 3)), np.zeros((3, 2), bool), "same non-empty"),
    (np.zeros((0,)), np.zeros((0,), bool), "same non-empty"),
    (np.array([[0.0, np.inf, 1.0]]), np.array([[True, False, True]]), "infinite"),
    (np.full((2, 2), np.nan), np.eye(2, dtype=bool), "0 scored pairs"),
    (np.arange(4.0), np.ones(4, bool), "members and non-members"),
    (np.arange(4.0), np.array([0, 1, 2, 1]), "boolean"),
])
def test_attack_intervals_bad_input(scores, member, match):
    with pytest.raises(ValueError, match=match):
        attack_intervals(scores, member, num_resamples=10)


def test_attack_intervals_bad_options_and_tiny_input():
    scores, member, _ = _attack_case(0, num_targets=2, num_examples=10)
    with pytest.raises(ValueError, match="fpr_levels"):
        attack_intervals(scores, member, fpr_levels=(0.01, 1.5))
    with pytest.raises(ValueError, match="confidence"):
        attack_intervals(scores, member, confidence=1.0)
    with pytest.raises(ValueError, match="num_resamples"):
        attack_intervals(scores, member, num_resamples=1)
    with pytest.raises(ValueError, match="too few"):  # 2 pairs: some resample has one class
        attack_intervals([0.0, 1.0], [False, True], num_resamples=50)
    with pytest.raises(ValueError, match="no interval at FPR 0.05"):
        attack_intervals(scores, member, num_resamples=10).tpr_at(0.05)


def test_mean_interval_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="finite"):
        mean_interval(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="shape of values"):
        mean_interval(np.zeros((2, 3)), np.ones((3, 2), bool))
    with pytest.raises(ValueError, match=r"models \[1\] have none"):
        mean_interval(np.zeros((2, 3)), np.array([[True] * 3, [False] * 3]))


# ------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("accuracy_b, attack_b, expected", [
    ((0.70, 0.80), (0.10, 0.20), "not distinguishable"),   # both overlap
    ((0.60, 0.70), (0.10, 0.20), "better"),    # equal attack success, a more accurate
    ((0.70, 0.80), (0.25, 0.30), "better"),    # equal accuracy, a less attackable
    ((0.60, 0.70), (0.25, 0.30), "better"),    # a ahead on both
    ((0.85, 0.90), (0.10, 0.20), "worse"),
    ((0.70, 0.80), (0.01, 0.05), "worse"),
    ((0.60, 0.70), (0.01, 0.05), "trade-off"),  # a more accurate, more attackable
])
def test_compare(accuracy_b, attack_b, expected):
    a = ((0.75, 0.82), (0.15, 0.22))
    assert compare(*a, accuracy_b, attack_b) == expected
    mirrored = {"better": "worse", "worse": "better"}.get(expected, expected)
    assert compare(accuracy_b, attack_b, *a) == mirrored
    assert expected in VERDICTS


def test_interval_order():
    assert interval_order((0.3, 0.4), (0.1, 0.2)) == 1
    assert interval_order((0.1, 0.2), (0.3, 0.4)) == -1
    assert interval_order((0.1, 0.3), (0.3, 0.4)) == 0  # touching intervals overlap


def test_compare_bad_interval():
    with pytest.raises(ValueError, match="accuracy_a must be a finite interval"):
        compare((0.9, 0.8), (0.1, 0.2), (0.1, 0.2), (0.1, 0.2))
    with pytest.raises(ValueError, match="attack_b"):
        compare((0.8, 0.9), (0.1, 0.2), (0.1, 0.2), (0.1, np.nan))
