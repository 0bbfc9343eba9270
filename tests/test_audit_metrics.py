"""Membership-inference metrics, disclosure-vs-vulnerability and plots."""
import itertools
import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from gujax.audit.attacks import MembershipScores, evaluate_attack
from gujax.audit.metrics import auc, balanced_accuracy, roc, tpr_at_fpr
from gujax.audit.plots import plot_disclosure_vs_attack, plot_roc
from gujax.audit.vulnerability import (disclosure_vs_vulnerability,
                                       per_example_vulnerability, top_k_probability)


def _random_case(seed, n=300, tied=False):
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.4
    if tied:  # few distinct values, members and non-members share them
        scores = rng.integers(0, 6, size=n).astype(float) + member * rng.integers(0, 2, n)
    else:
        scores = rng.normal(size=n) + 0.7 * member
    return scores, member


def _naive_rates(scores, member, threshold):
    """(fpr, tpr) of the rule "member iff score >= threshold", from the definition."""
    predicted = scores >= threshold
    return (np.sum(predicted & ~member) / np.sum(~member),
            np.sum(predicted & member) / np.sum(member))


def _naive_points(scores, member):
    thresholds = np.concatenate([[np.inf], np.unique(scores)])
    return np.array([_naive_rates(scores, member, t) for t in thresholds])


# ---------------------------------------------------------------- roc / auc


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_matches_sklearn(seed, tied):
    scores, member = _random_case(seed, tied=tied)
    curve = roc(scores, member)
    fpr, tpr, thresholds = roc_curve(member, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_array_equal(curve.thresholds[1:], thresholds[1:])
    assert curve.thresholds[0] == np.inf
    if tied:
        assert curve.fpr.size <= 8  # one point per distinct score, plus (0, 0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_auc_matches_sklearn_and_mann_whitney(seed, tied):
    scores, member = _random_case(seed, tied=tied)
    value = auc(scores, member)
    assert value == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    # Straight from the definition: P(member > non-member) + 1/2 P(tie).
    pos, neg = scores[member][:, None], scores[~member][None, :]
    naive = np.mean((pos > neg) + 0.5 * (pos == neg))
    assert value == pytest.approx(naive, abs=1e-12)


def test_auc_extremes():
    member = np.array([True, True, False, False])
    assert auc([4.0, 3.0, 2.0, 1.0], member) == 1.0
    assert auc([1.0, 2.0, 3.0, 4.0], member) == 0.0
    assert auc([1.0, 1.0, 1.0, 1.0], member) == 0.5


# ---------------------------------------------------------------- tpr at fpr


def test_tpr_at_fpr_hand_made_with_tie():
    # Members 4, 3, 2; non-members 3, 1. The member and non-member tied at 3
    # can only be taken together, so at FPR 0 only the member at 4 is found.
    scores = np.array([4.0, 3.0, 3.0, 2.0, 1.0])
    member = np.array([True, True, False, True, False])
    assert tpr_at_fpr(scores, member, 0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(scores, member, 0.49) == pytest.approx(1 / 3)
    assert tpr_at_fpr(scores, member, 0.5) == 1.0
    assert tpr_at_fpr(scores, member, 1.0) == 1.0
    np.testing.assert_allclose(tpr_at_fpr(scores, member, [0.0, 0.5]), [1 / 3, 1.0])


def test_tpr_at_fpr_zero_when_top_score_is_tied():
    # The best member is tied with a non-member: no threshold separates them.
    scores = np.array([5.0, 5.0, 3.0, 1.0])
    member = np.array([True, False, True, False])
    assert tpr_at_fpr(scores, member, 0.0) == 0.0
    assert tpr_at_fpr(scores, member, 0.49) == 0.0
    assert tpr_at_fpr(scores, member, 0.5) == 1.0


@pytest.mark.parametrize("tied", [False, True])
def test_tpr_at_fpr_matches_brute_force(tied):
    scores, member = _random_case(3, n=200, tied=tied)
    points = _naive_points(scores, member)
    targets = np.array([0.0, 1e-3, 0.01, 0.05, 0.1, 0.33, 1.0])
    expected = [points[points[:, 0] <= t, 1].max() for t in targets]
    np.testing.assert_allclose(tpr_at_fpr(scores, member, targets), expected)


def test_balanced_accuracy_matches_brute_force():
    scores = np.array([4.0, 3.0, 3.0, 2.0, 1.0])
    member = np.array([True, True, False, True, False])
    assert balanced_accuracy(scores, member) == pytest.approx(0.75)
    for tied in (False, True):
        scores, member = _random_case(4, tied=tied)
        points = _naive_points(scores, member)
        expected = np.max((points[:, 1] + 1 - points[:, 0]) / 2)
        assert balanced_accuracy(scores, member) == pytest.approx(expected)


@pytest.mark.parametrize("fn", [roc, auc, balanced_accuracy,
                                lambda s, m: tpr_at_fpr(s, m, 0.01)])
def test_metrics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="members and non-members"):
        fn([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="members and non-members"):
        fn([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="finite"):
        fn([1.0, np.nan], [True, False])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="boolean"):
        fn([1.0, 2.0], [2, 0])


def test_tpr_at_fpr_rejects_bad_target():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tpr_at_fpr([1.0, 2.0], [True, False], 1.5)


# ---------------------------------------------------------------- evaluate_attack


def test_evaluate_attack_pooled_and_per_target():
    rng = np.random.default_rng(5)
    in_mask = rng.random((4, 500)) < 0.5
    scores = rng.normal(size=(4, 500)) + 0.8 * in_mask
    scores[0, :3] = np.nan
    result = evaluate_attack(scores, in_mask)
    valid = ~np.isnan(scores)
    assert result.num_excluded == 3
    assert result.auc == pytest.approx(roc_auc_score(in_mask[valid], scores[valid]))
    for m in range(4):
        keep = valid[m]
        assert result.per_target_auc[m] == pytest.approx(
            roc_auc_score(in_mask[m, keep], scores[m, keep]))
        np.testing.assert_allclose(
            result.per_target_tpr_at_fpr[m],
            tpr_at_fpr(scores[m, keep], in_mask[m, keep], [1e-3, 1e-2]))
    np.testing.assert_allclose(
        result.tpr_at_fpr, tpr_at_fpr(scores[valid], in_mask[valid], [1e-3, 1e-2]))
    assert result.balanced_accuracy == pytest.approx(
        balanced_accuracy(scores[valid], in_mask[valid]))
    json.dumps(result.summary())


def test_tpr_at_looks_up_a_computed_fpr_level_by_value():
    rng = np.random.default_rng(11)
    in_mask = rng.random((3, 400)) < 0.5
    scores = rng.normal(size=(3, 400)) + in_mask
    result = evaluate_attack(scores, in_mask, fpr_levels=(0.0, 0.05, 1e-2))
    assert result.tpr_at(0.05) == result.tpr_at_fpr[1]
    assert result.tpr_at(0.01) == result.tpr_at_fpr[2]
    assert result.tpr_at(0.1 / 10) == result.tpr_at_fpr[2]    # equal to rounding
    assert result.tpr_at(0) == tpr_at_fpr(scores.ravel(), in_mask.ravel(), 0.0)
    np.testing.assert_array_equal(result.per_target_tpr_at(0.05),
                                  result.per_target_tpr_at_fpr[:, 1])
    assert isinstance(result.tpr_at(0.05), float)
    default = evaluate_attack(scores, in_mask)
    assert default.tpr_at(1e-3) == default.tpr_at_fpr[0]
    with pytest.raises(ValueError, match=r"FPR 0\.1 was not computed.*\[0\.0, 0\.05, 0\.01\]"):
        result.tpr_at(0.1)
    with pytest.raises(ValueError, match=r"FPR 0\.011 was not computed"):
        result.tpr_at(0.011)
    with pytest.raises(ValueError, match=r"levels are \[0\.001, 0\.01\]"):
        default.per_target_tpr_at(0.05)


def test_evaluate_attack_target_without_members_is_nan():
    in_mask = np.array([[True, False, True, False], [False, False, False, False]])
    scores = np.arange(8.0).reshape(2, 4)
    result = evaluate_attack(scores, in_mask)
    assert np.isnan(result.per_target_auc[1])
    assert result.per_target_auc[0] == 0.25  # members 0, 2 vs non-members 1, 3
    assert json.loads(json.dumps(result.summary()))["per_target"]["auc"][1] is None


def test_evaluate_attack_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        evaluate_attack(np.zeros(4), np.zeros(4, bool))
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        evaluate_attack(np.zeros((2, 4)), np.zeros((2, 3), bool))


# ---------------------------------------------------------------- vulnerability


def test_per_example_vulnerability_matches_loop():
    rng = np.random.default_rng(6)
    in_mask = rng.random((5, 40)) < 0.5
    in_mask[:, 0] = False  # never a member
    scores = rng.normal(size=(5, 40))
    scores[1, 3] = np.nan
    result = per_example_vulnerability(scores, in_mask)
    for j in range(40):
        values = [scores[m, j] for m in range(5) if in_mask[m, j] and not np.isnan(scores[m, j])]
        if values:
            assert result[j] == pytest.approx(np.mean(values))
        else:
            assert np.isnan(result[j])


def test_spearman_and_precision_on_monotone_cases():
    rng = np.random.default_rng(7)
    d = rng.exponential(size=200)
    same = disclosure_vs_vulnerability(d, np.log(d) * 3 + 1, ks=(10, 50))
    assert same.spearman_rho == pytest.approx(1.0)
    np.testing.assert_allclose(same.precision_at_k, 1.0)
    np.testing.assert_allclose(same.chance_precision, [0.05, 0.25])
    reverse = disclosure_vs_vulnerability(d, -d, ks=(10, 100))
    assert reverse.spearman_rho == pytest.approx(-1.0)
    np.testing.assert_allclose(reverse.precision_at_k, 0.0)
    json.dumps(same.summary())


def test_spearman_matches_pearson_of_ranks_and_scipy_pvalue():
    rng = np.random.default_rng(8)
    d = rng.normal(size=100)
    v = d + rng.normal(size=100)  # population rho about 0.7
    v[:10] = np.round(v[:10])  # some ties
    result = disclosure_vs_vulnerability(d, v, ks=(5,))
    rd, rv = stats.rankdata(d), stats.rankdata(v)
    naive = np.corrcoef(rd, rv)[0, 1]
    assert result.spearman_rho == pytest.approx(naive, abs=1e-12)
    assert result.spearman_pvalue == pytest.approx(stats.spearmanr(d, v).pvalue)
    assert 0 < result.spearman_pvalue < 0.05  # a real association, n = 100


def test_precision_at_k_with_ties_is_expected_overlap():
    d = np.array([3.0, 2.0, 2.0, 1.0])
    v = np.array([3.0, 2.0, 1.0, 0.0])
    # top-2 by d: index 0, then 1 or 2 (each with probability 1/2);
    # top-2 by v: {0, 1}. Expected overlap 1.5, precision 0.75.
    assert disclosure_vs_vulnerability(d, v, ks=(2,)).precision_at_k[0] == 0.75


def _brute_force_precision(d, v, k):
    """Average over every tie-breaking order of both rankings."""
    n = len(d)
    total, count = 0.0, 0
    for pd in itertools.permutations(range(n)):
        top_d = set(sorted(range(n), key=lambda i: (-d[i], pd[i]))[:k])
        for pv in itertools.permutations(range(n)):
            top_v = set(sorted(range(n), key=lambda i: (-v[i], pv[i]))[:k])
            total += len(top_d & top_v) / k
            count += 1
    return total / count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_at_k_matches_tie_breaking_enumeration(seed):
    rng = np.random.default_rng(seed)
    d = rng.integers(0, 3, size=5).astype(float)
    v = rng.integers(0, 3, size=5).astype(float)
    for k in (1, 2, 3):
        result = disclosure_vs_vulnerability(d, v, ks=(k,))
        assert result.precision_at_k[0] == pytest.approx(_brute_force_precision(d, v, k))
        assert np.sum(top_k_probability(d, k)) == pytest.approx(k)


def test_disclosure_vs_vulnerability_excludes_nan_and_checks_input():
    d = np.arange(10.0)
    v = np.arange(10.0)
    v[0] = np.nan
    result = disclosure_vs_vulnerability(d, v, ks=(3,))
    assert (result.num_examples, result.num_excluded) == (9, 1)
    with pytest.raises(ValueError, match="integer in"):
        disclosure_vs_vulnerability(d, v, ks=(10,))
    with pytest.raises(ValueError, match="shape"):
        disclosure_vs_vulnerability(d, v[:5], ks=(3,))
    with pytest.raises(ValueError, match="at least 3"):
        disclosure_vs_vulnerability([1.0, np.nan, 2.0], [1.0, 2.0, 3.0], ks=(1,))


# ---------------------------------------------------------------- plots


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(9)
    in_mask = rng.random((3, 400)) < 0.5
    strong = rng.normal(size=(3, 400)) + 1.5 * in_mask
    weak = rng.normal(size=(3, 400)) + 0.3 * in_mask
    curve = roc(weak.ravel(), in_mask.ravel())
    path = tmp_path / "roc.png"
    ax = plot_roc({"strong": evaluate_attack(strong, in_mask),
                   "weak": (curve.fpr, curve.tpr),
                   "scores": MembershipScores(strong, in_mask)}, path=path)
    assert _is_png(path)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[-1] == "chance" and len(labels) == 4
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="empty"):
        plot_roc({})


def test_plot_disclosure_vs_attack_writes_png(tmp_path):
    rng = np.random.default_rng(10)
    d = rng.exponential(size=50)
    path = tmp_path / "scatter.png"
    ax = plot_disclosure_vs_attack(d, d + rng.normal(size=50), path=path)
    assert _is_png(path)
    assert "Spearman" in ax.get_title()
    with pytest.raises(ValueError, match="shape"):
        plot_disclosure_vs_attack(d, d[:3])
