"""gujax.audit.epsilon and experiments.audit_epsilon: the one-run bound
against the binomial inversion it reduces to, its coverage on a mechanism of
known epsilon, the multi-run bound between naive Clopper-Pearson envelopes,
the scores against the definitions, and the honest checks on trained models
(non-private SGD is caught, DP-SGD never beats its accountant)."""
import json
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
from jax_privacy import auditing

from gujax.arms import parse_arm
from gujax.audit import (best_one_run_epsilon, epsilon_lower_bound, multi_run_epsilon,
                         one_run_epsilon)
from gujax.audit.canaries import (canary_membership, insert_canaries, mislabelled_canaries,
                                  train_canary_runs)
from gujax.audit.epsilon import (canary_logits, canary_loss_scores, reference_scores)
from gujax.data import load
from gujax.data.splits import subset
from gujax.models import MLP
from gujax.train import TrainConfig


def naive_binomial_bound(r, v, confidence):
    """The largest eps with P[Binomial(r, e^eps / (1 + e^eps)) >= v] <= 1 - confidence."""
    def tail(eps):
        return scipy.stats.binom.sf(v - 1, r, scipy.special.expit(eps)) - (1 - confidence)
    if tail(0.0) >= 0:
        return 0.0
    return scipy.optimize.brentq(tail, 0.0, 50.0, xtol=1e-10)


@pytest.mark.parametrize("r,v,m", [(10, 10, 20), (50, 40, 100), (200, 130, 1000),
                                   (7, 5, 7), (1000, 560, 5000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_delta_zero_is_the_binomial_inversion(r, v, m, confidence):
    got = epsilon_lower_bound(r, v, num_canaries=m, delta=0, confidence=confidence)
    assert got == pytest.approx(naive_binomial_bound(r, v, confidence), abs=2e-6)


def test_delta_term_against_the_public_auditor_and_monotone():
    m, r, v = 400, 120, 100
    # Scores that put exactly v included and r - v left-out canaries above 0.5.
    in_scores = np.r_[np.ones(v), np.zeros(200 - v)]
    out_scores = np.r_[np.ones(r - v), np.zeros(200 - (r - v))]
    auditor = auditing.CanaryScoreAuditor(in_scores, out_scores)
    for delta in (1e-6, 1e-3):
        want = auditor.epsilon_one_run(0.05, delta, threshold_strategy=auditing.Explicit(0.5))
        assert epsilon_lower_bound(r, v, num_canaries=m, delta=delta) == pytest.approx(
            want, abs=1e-6)
    values = [epsilon_lower_bound(r, v, num_canaries=m, delta=d) for d in (0, 1e-6, 1e-3, 1e-2)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] >= 0
    assert epsilon_lower_bound(r, v - 10, num_canaries=m, delta=1e-5) < values[1]
    # No better than chance refutes nothing.
    assert epsilon_lower_bound(100, 50, num_canaries=200, delta=0) == 0.0
    assert epsilon_lower_bound(0, 0, num_canaries=200, delta=0) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_guesses=5, num_correct=6, num_canaries=10), "num_correct"),
    (dict(num_guesses=11, num_correct=6, num_canaries=10), "num_canaries"),
    (dict(num_guesses=5, num_correct=-1, num_canaries=10), "num_correct"),
    (dict(num_guesses=5, num_correct=4, num_canaries=10, delta=1.0), "delta"),
    (dict(num_guesses=5, num_correct=4, num_canaries=10, confidence=1.0), "confidence"),
    (dict(num_guesses=5.0, num_correct=4, num_canaries=10), "num_guesses"),
])
def test_bound_input_errors(kwargs, match):
    kwargs.setdefault("delta", 0.0)
    with pytest.raises(ValueError, match=match):
        epsilon_lower_bound(**kwargs)


def _randomized_response(rng, m, eps):
    """m canary bits and an eps-DP view of each: the bit, flipped with
    probability 1 / (1 + e^eps), plus a uniform tie-breaker."""
    bits = rng.random(m) < 0.5
    keep = rng.random(m) < scipy.special.expit(eps)
    return np.where(keep, bits, ~bits) + rng.random(m) * 0.1, bits


def test_one_run_bound_covers_a_mechanism_of_known_epsilon():
    """Randomized response is exactly eps-DP per canary: the bound at 95 %
    must exceed eps in at most ~5 % of audits, and must find it when it is
    large."""
    rng = np.random.default_rng(0)
    eps, trials = 1.0, 150
    exceed = sum(one_run_epsilon(*_randomized_response(rng, 500, eps), delta=1e-6).epsilon > eps
                 for _ in range(trials))
    # 99.9 % quantile of Binomial(150, 0.05) is 17.
    assert exceed <= scipy.stats.binom.ppf(0.999, trials, 0.05)
    strong = one_run_epsilon(*_randomized_response(rng, 2000, 4.0), delta=1e-6)
    assert 2.5 < strong.epsilon <= 4.0
    assert strong.num_correct <= strong.num_guesses <= 2000
    fdp = one_run_epsilon(*_randomized_response(rng, 2000, 4.0), delta=1e-6, method="fdp")
    assert 2.5 < fdp.epsilon


def test_bonferroni_over_tests_costs_significance():
    rng = np.random.default_rng(1)
    scores, bits = _randomized_response(rng, 1000, 3.0)
    one = best_one_run_epsilon({"a": (scores, bits)}, delta=1e-6)
    three = best_one_run_epsilon({"a": (scores, bits), "b": (scores, bits),
                                  "c": (scores, bits)}, delta=1e-6)
    assert three.epsilon < one.epsilon and three.num_tests == 3 * one.num_tests
    # The correction is exactly a confidence of 1 - 0.05 / tests per (score, fraction).
    r, v = three.num_guesses, three.num_correct
    assert three.epsilon == pytest.approx(epsilon_lower_bound(
        r, v, num_canaries=1000, delta=1e-6, confidence=1 - 0.05 / three.num_tests), abs=1e-9)
    with pytest.raises(ValueError, match="both"):
        one_run_epsilon(scores, np.ones(1000, bool), delta=1e-6)
    with pytest.raises(ValueError, match="finite"):
        one_run_epsilon(np.r_[np.nan, scores[1:]], bits, delta=1e-6)
    with pytest.raises(ValueError, match="guess_fractions"):
        one_run_epsilon(scores, bits, delta=1e-6, guess_fractions=(0.0,))


def _naive_cp(in_scores, out_scores, threshold, significance, delta):
    """Clopper-Pearson eps at one threshold, from the beta quantiles."""
    n_in, n_out = len(in_scores), len(out_scores)
    fn, fp = int((in_scores < threshold).sum()), int((out_scores >= threshold).sum())
    fnr_ub = 1.0 if fn == n_in else scipy.stats.beta.ppf(1 - significance / 2, fn + 1, n_in - fn)
    fpr_ub = 1.0 if fp == n_out else scipy.stats.beta.ppf(1 - significance / 2, fp + 1,
                                                          n_out - fp)
    tpr_lb = 1 - fnr_ub
    return max(0.0, math.log(tpr_lb - delta) - math.log(fpr_ub)) if tpr_lb > delta else 0.0


def test_multi_run_bound_between_naive_clopper_pearson_envelopes():
    rng = np.random.default_rng(2)
    runs = 200
    bits = rng.random((runs, 1)) < 0.5
    scores = rng.normal(size=(runs, 1)) + 2.5 * bits
    got = multi_run_epsilon(scores, bits, delta=1e-5)
    ins, outs = scores[bits[:, 0], 0], scores[~bits[:, 0], 0]
    thresholds = np.r_[np.unique(scores), np.inf]
    # Without any correction over thresholds: an upper envelope; with
    # Bonferroni over every distinct threshold: a lower one.
    upper = max(_naive_cp(ins, outs, t, 0.05, 1e-5) for t in thresholds)
    lower = max(_naive_cp(ins, outs, t, 0.05 / len(thresholds), 1e-5) for t in thresholds)
    assert 0.5 < lower <= got + 1e-9 and got <= upper + 1e-9
    # Several canaries: the median of per-canary bounds at half the significance.
    many = np.concatenate([scores, scores[::-1]], axis=1)
    many_bits = np.concatenate([bits, bits[::-1]], axis=1)
    assert 0 < multi_run_epsilon(many, many_bits, delta=1e-5) < got
    with pytest.raises(ValueError, match="both"):
        multi_run_epsilon(scores, np.ones_like(bits), delta=1e-5)


def test_loss_and_reference_scores_against_the_definitions():
    rng = np.random.default_rng(3)
    logits, refs = rng.normal(size=(3, 5, 4)) * 3, rng.normal(size=(4, 5, 4)) * 3
    labels = rng.integers(0, 4, size=5)

    def log_p(z):
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        return np.log(np.take_along_axis(p, np.broadcast_to(labels[:, None], z.shape[:-1] + (1,)),
                                         -1)[..., 0])

    np.testing.assert_allclose(canary_loss_scores(logits, labels), log_p(logits), rtol=1e-12)
    phi = log_p(logits) - np.log1p(-np.exp(log_p(logits)))
    ref_phi = log_p(refs) - np.log1p(-np.exp(log_p(refs)))
    spread = np.sqrt(sum((ref_phi[q, j] - ref_phi[:, j].mean()) ** 2
                         for q in range(4) for j in range(5)) / (4 * 5 - 5))
    np.testing.assert_allclose(reference_scores(logits, refs, labels),
                               (phi - ref_phi.mean(0)) / spread, rtol=1e-9)
    with pytest.raises(ValueError, match="reference_logits"):
        reference_scores(logits, refs[:1], labels)


# ----------------------------------------------------------------------------
# The honest checks, on trained models.

@pytest.fixture(scope="module")
def mislabel_audit():
    """Non-private SGD and DP-SGD at eps = 1, audited with the same 64
    mislabelled canaries over 4 runs (256 slots) on a 128-digit base set."""
    digits = load("digits", "train")
    order = np.random.default_rng(0).permutation(len(digits))
    base, source = subset(digits, np.sort(order[:128])), subset(digits, np.sort(order[128:]))
    canaries = mislabelled_canaries(source, 64, seed=0)
    in_mask = canary_membership(64, 4, seed=1)
    sets = [insert_canaries(base.images, base.labels, canaries, m)[:2] for m in in_mask]
    model = MLP(hidden=(128,))
    config = TrainConfig(epochs=40, batch_size=32, learning_rate=0.5, progress=False,
                         eval_every=40, checkpoint_every=10_000)
    out = {}
    for text in ("sgd", "dpsgd:eps=1"):
        runs = train_canary_runs(parse_arm(text), model=model, config=config, sets=sets,
                                 seeds=[10, 11, 12, 13])
        scores = canary_loss_scores(canary_logits(model, [r.params for r in runs], canaries.images),
                             canaries.labels)
        out[text] = (one_run_epsilon(scores, in_mask, delta=1e-5), runs)
    return out


def test_non_private_sgd_is_caught_by_mislabelled_canaries(mislabel_audit):
    bound, _ = mislabel_audit["sgd"]
    # About 2 on this audit (a perfect attack would show about 2.8).
    assert bound.epsilon > 1.0, bound


def test_dpsgd_never_beats_its_accountant(mislabel_audit):
    bound, runs = mislabel_audit["dpsgd:eps=1"]
    accountant = max(r.epsilon for r in runs)
    assert accountant <= 1.0 + 1e-9
    assert bound.epsilon <= accountant, bound


# ----------------------------------------------------------------------------
# The experiment.

@pytest.mark.slow  # minutes on 2 cores: out of CI (conftest), run locally
def test_audit_epsilon_smoke(tmp_path):
    from experiments import audit_epsilon
    out = tmp_path / "smoke"
    results = audit_epsilon.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    for name in ("run.json", "results.json", "results.csv", "table.md",
                 "epsilon_vs_accuracy.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in saved["arms"]] == ["dpsgd eps=1", "gnq-censor tau=8"]
    sets = ["mislabel", "dirac", "mislabel x2"]
    assert [u["canaries"] for u in saved["units"]] == sets * 2
    for unit in saved["units"]:
        assert 0 <= unit["eps_best"] <= unit["eps_ceiling"] + 1e-9
        assert unit["canary_slots"] == 16
        assert (unit.get("eps_whitebox") is not None) == (unit["canary_kind"] == "dirac")
    for row in saved["arms"] + saved["units"]:     # accuracy with its 95 % interval
        assert row["test_accuracy_low"] <= row["test_accuracy"] <= row["test_accuracy_high"]
        assert row["test_accuracy_high"] - row["test_accuracy_low"] > 0
    assert "acc low" in (out / "table.md").read_text()
    dp = saved["arms"][0]
    assert 0.99 < dp["epsilon_theory"] <= 1.0 + 1e-9   # calibrated to just under the target
    npz = np.load(out / "scores" / "gnq-censor_tau_8" / "mislabel_x2.npz")
    np.testing.assert_array_equal(npz["in_mask"], np.load(
        out / "scores" / "gnq-censor_tau_8" / "mislabel.npz")["in_mask"])    # same bits for every k
    assert results["units"][0]["arm"] == "dpsgd eps=1"
    # A used --out is refused without --resume; --resume keeps the finished
    # arms (arms/<arm>.json) instead of training them again.
    with pytest.raises(SystemExit) as err:
        audit_epsilon.main(["--preset", "smoke", "--out", str(out)])
    assert err.value.code == 2
    kept = out / "arms" / "dpsgd_eps_1.json"
    summary, units = json.loads(kept.read_text())
    summary["eps_any"] = 123.0                        # a marker only a reused arm carries
    kept.write_text(json.dumps([summary, units]))
    resumed = audit_epsilon.main(["--preset", "smoke", "--out", str(out), "--resume",
                                  "--no-progress"])
    assert resumed["arms"][0]["eps_any"] == 123.0
    # The other arm is trained again, to the same result (fixed seeds).
    assert resumed["arms"][1]["eps_any"] == results["arms"][1]["eps_any"]
    assert [u["eps_best"] for u in resumed["units"]] == [u["eps_best"] for u in
                                                        results["units"]]


def test_featurised_canaries_are_mislabelled_only(tmp_path, capsys):
    from experiments import audit_epsilon
    with pytest.raises(SystemExit) as err:
        audit_epsilon.main(["--preset", "cifar", "--canary-kinds", "mislabel", "ood",
                            "--out", str(tmp_path / "never")])
    assert err.value.code == 2 and "featurised" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_cifar_preset_help_names_the_layouts_it_loads(tmp_path):
    """The cifar preset's help names the image folder the README uses, and
    the preset loads one (as well as the python batches and TFDS, through
    gujax.data.load)."""
    import dataclasses
    from PIL import Image
    from experiments import audit_epsilon, registry
    note = " ".join(audit_epsilon.PRESETS["cifar"].note.split())
    for layout in ("image folder DIR/train/<class>/<image>.png", "python batches", "TFDS"):
        assert layout in note
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck"]
    for split, count in (("train", 2), ("test", 1)):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(
                    tmp_path / split / c / f"{i}.png")
    settings = dataclasses.replace(audit_epsilon.PRESETS["cifar"], data_dir=str(tmp_path))
    train, test = registry.load_data(settings, 0, settings.population_size)
    assert len(train.labels) == 20 and len(test.labels) == 10
