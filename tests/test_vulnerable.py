"""The canary (most-vulnerable-sample) protocol: always-in base rows,
balanced canary groups, the attack on the canaries alone, the adaptive
canary families, and experiments.vulnerable end to end."""
import json

import numpy as np
import pytest

from gujax.arms import parse_arm
from gujax.audit.canaries import canary_copies, mislabelled_canaries
from gujax.audit.shadow import (ResumeMismatch, ShadowRecord, ShadowSpec, attack,
                                check_shadow_run, group_scores, run_shadow_models)
from gujax.audit.shadow.training import membership
from gujax.data import load, random_subset
from gujax.data.splits import canary_membership_design
from gujax.models import MLP
from gujax.train import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train"), load("digits", "test")


def _spec(**fields):
    args = dict(model=MLP(hidden=(8,)), config=TrainConfig(epochs=1, batch_size=8,
                                                           progress=False),
                num_models=8, seed=3)
    args.update(fields)
    return ShadowSpec(parse_arm("sgd"), **args)


def test_always_in_rows_are_in_every_model_and_each_group_in_exactly_half(digits):
    pool = random_subset(digits[0], 5 + 3 + 2 * 4, 0)
    spec = _spec(always_in=5, canary_groups=((3, 1), (2, 4)))
    mask = membership(spec, pool)
    assert mask.shape == (8, 16)
    assert mask[:, :5].all()                               # the base set: always IN
    groups = spec.groups(16)
    np.testing.assert_array_equal(groups, [-1] * 5 + [0, 1, 2] + [3] * 4 + [4] * 4)
    for g in range(5):
        columns = mask[:, groups == g]
        assert np.all(columns == columns[:, :1])          # a group's copies move together
        assert columns[:, 0].sum() == 4                    # IN in exactly half of 8
    # Different groups get different (random) halves, not one shared pattern.
    assert len({tuple(mask[:, groups == g][:, 0]) for g in range(5)}) > 1
    # The population protocol is untouched: independent coins, no always-in rows.
    plain = membership(_spec(), pool)
    assert not plain[:, :5].all()


def test_canary_spec_is_checked_and_part_of_the_identity(digits, tmp_path):
    train, test = digits
    pool, population = random_subset(train, 60, 0), random_subset(test, 10, 1)
    with pytest.raises(ValueError, match="even"):
        _spec(num_models=5, always_in=10)
    with pytest.raises(ValueError, match="cover"):
        check_shadow_run(_spec(always_in=50, canary_groups=((3, 2),)), pool=pool,
                         population=population)
    spec = _spec(num_models=4, always_in=50, canary_groups=((10, 1),))
    run_shadow_models(spec, pool=pool, population=population, workdir=str(tmp_path / "w"),
                      progress=False)
    with pytest.raises(ResumeMismatch, match="always_in"):
        check_shadow_run(_spec(num_models=4, always_in=40, canary_groups=((10, 2),)),
                         pool=pool, population=population, workdir=str(tmp_path / "w"))


def _synthetic_record(seed=0, base=30, blocks=((40, 1), (10, 3)), models=16, signal=1.5):
    """A canary-protocol record with a planted membership signal on the canaries."""
    rng = np.random.default_rng(seed)
    groups = np.concatenate([np.full(base, -1)] + [
        np.repeat(np.arange(sum(c for c, _ in blocks[:i]), sum(c for c, _ in blocks[:i + 1])),
                  k) for i, (_, k) in enumerate(blocks)])
    n = len(groups)
    in_mask = canary_membership_design(groups, models, seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    logits = rng.normal(size=(models, n, 1, 3)).astype(np.float32)
    logits[np.arange(models)[:, None], np.arange(n)[None], 0, labels[None]] += (
        signal * in_mask).astype(np.float32)
    z = 5
    zeros = np.zeros((models, n), np.float32)
    return ShadowRecord(
        arm={}, pool_ids=np.arange(n), pool_labels=labels, population_labels=np.zeros(z, int),
        augmentations=("identity",), in_mask=in_mask, logits=logits,
        population_logits=rng.normal(size=(models, z, 1, 3)).astype(np.float32),
        disclosure=zeros, cumulative_gnq=zeros, steps_used=zeros.astype(np.int32),
        retired=zeros.astype(bool), train_accuracy=np.ones(models),
        test_accuracy=np.ones(models), wall_seconds=np.ones(models),
        noise_multiplier=np.full(models, np.nan), epsilon=np.full(models, np.nan),
        groups=groups)


def test_the_attack_scores_the_canaries_alone():
    record = _synthetic_record()
    base = record.groups < 0
    # Base rows with wild, member-like confidences: with the pooled variance
    # they would change every canary score if the attack looked at them.
    wild = record.logits.copy()
    wild[:, base] *= 50.0
    for global_variance in (True, False):
        a = attack(record, global_variance=global_variance, bootstrap_resamples=0)
        b = attack(record._replace(logits=wild), global_variance=global_variance,
                   bootstrap_resamples=0)
        assert np.all(np.isnan(a.lira_scores[:, base]))
        assert np.all(np.isfinite(a.lira_scores[:, ~base]))
        np.testing.assert_array_equal(a.canary.scores, b.canary.scores)
    audit = attack(record, bootstrap_resamples=200)
    canary = audit.canary
    assert canary.scores.shape == (16, 50)
    np.testing.assert_array_equal(canary.group_size, [1] * 40 + [3] * 10)
    # Every (target, group) pair is scored; half of them are members.
    assert canary.evaluation.num_excluded == 0
    assert canary.is_member.sum() == 16 * 50 // 2
    assert canary.evaluation.auc > 0.75                 # the planted signal is found
    lo, hi = canary.intervals.auc
    assert lo <= canary.evaluation.auc <= hi
    # The population evaluation covers the canary rows only (one per copy).
    assert audit.evaluations["lira_online"].num_excluded == 0


def test_no_signal_gives_chance_on_canaries():
    audit = attack(_synthetic_record(seed=1, signal=0.0, models=32), bootstrap_resamples=200)
    lo, hi = audit.canary.intervals.auc
    assert lo < 0.5 < hi


def test_an_arm_without_a_ledger_reports_no_ledger_figures():
    from experiments.vulnerable import _ledger_fields
    record = _synthetic_record()
    in_rows = record.in_mask & (record.groups >= 0)[None]
    # A DP-SGD arm with ledger=false records zeros: they must not read as
    # "admitted in no step, never retired".
    assert set(_ledger_fields(record, in_rows, 3, False).values()) == {None}
    used = record.steps_used.copy()
    used[in_rows] = 6
    retired = record.retired.copy()
    retired[0] = True
    fields = _ledger_fields(record._replace(steps_used=used, retired=retired), in_rows, 3, True)
    assert fields["canary_steps_used_mean"] == 6.0
    assert fields["canary_admitted_step_fraction"] == 2.0
    assert fields["canary_used_fraction"] == 1.0
    np.testing.assert_allclose(fields["canary_admitted_fraction"],
                               1 - retired[in_rows].mean())


def test_duplicated_and_clustered_canaries_move_together(digits):
    train = digits[0]
    canaries = mislabelled_canaries(random_subset(train, 50, 0), 6, seed=1)
    assert np.all(canaries.labels != train.labels[np.searchsorted(train.ids,
                                                                  canaries.source_ids)])
    dup, dup_labels = canary_copies(canaries, 4)
    assert dup.shape == (24, 8, 8, 1)
    for i in range(6):
        assert np.all(dup[4 * i:4 * i + 4] == canaries.images[i])
        assert np.all(dup_labels[4 * i:4 * i + 4] == canaries.labels[i])
    near, near_labels = canary_copies(canaries, 4, near=True, seed=2, noise=8.0)
    np.testing.assert_array_equal(near_labels, dup_labels)
    for i in range(6):
        assert np.array_equal(near[4 * i], canaries.images[i])       # copy 0: the canary
        copies = near[4 * i + 1:4 * i + 4].astype(float)
        assert not np.any([np.array_equal(c, canaries.images[i]) for c in copies])
        # Small perturbations: much closer to their canary than to another image.
        own = np.abs(copies - canaries.images[i].astype(float)).mean()
        other = np.abs(copies - canaries.images[(i + 1) % 6].astype(float)).mean()
        assert own < other
    # Membership and scoring per group: a group split across IN/OUT is refused.
    groups = np.array([-1, -1, 0, 0, 1, 1, 1])
    mask = canary_membership_design(groups, 6, 0)
    scores, members = group_scores(np.arange(42.0).reshape(6, 7), mask, groups)
    np.testing.assert_allclose(scores[:, 0], np.arange(42.0).reshape(6, 7)[:, 2:4].mean(1))
    np.testing.assert_array_equal(members[:, 1], mask[:, 4])
    broken = mask.copy()
    broken[0, 4] = ~broken[0, 4]
    with pytest.raises(ValueError, match="together"):
        group_scores(np.zeros((6, 7)), broken, groups)


def _tpr_at(scores, member, fpr):
    """TPR at FPR <= fpr of 'score >= t' over every threshold t (independent of
    gujax.audit.metrics)."""
    pos, neg = scores[member], scores[~member]
    best = 0.0
    for t in np.unique(scores):
        if np.mean(neg >= t) <= fpr:
            best = max(best, float(np.mean(pos >= t)))
    return best


@pytest.mark.slow
def test_smoke_experiment_end_to_end_and_rederived(tmp_path, capsys):
    from experiments import vulnerable
    out = tmp_path / "smoke"
    vulnerable.main(["--preset", "smoke", "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    for name in ("results.csv", "table.md", "tpr_vs_accuracy.png", "run.json"):
        assert (out / name).exists()
    families = results["config"]["families"]
    assert families == ["mislabel", "dup 2", "cluster 3"]
    assert {u["family"] for u in results["units"]} == set(families)
    for arm in results["arms"]:
        saved = np.load(out / arm["scores_file"])
        assert saved["in_mask"][:, saved["groups"] < 0].all()
        assert np.all(saved["is_member"].sum(0) == results["config"]["num_models"] // 2)
        for f, family in enumerate(families):
            unit = next(u for u in results["units"]
                        if u["arm"] == arm["arm"] and u["family"] == family)
            chosen = saved["group_family"] == f
            for fpr, key in ((0.01, "canary_tpr_at_1pct_fpr"),
                             (0.001, "canary_tpr_at_0.1pct_fpr")):
                got = _tpr_at(saved["scores"][:, chosen], saved["is_member"][:, chosen], fpr)
                assert got == pytest.approx(unit[key], abs=1e-12)
                lo, hi = unit[f"{key}_ci"]
                assert lo <= unit[key] + 1e-12 and unit[key] <= hi + 1e-12
    assert [m["arm"] for m in results["matches"]] == ["gnq-censor tau=8"]
    assert results["matches"][0]["matched_dpsgd"] == "dpsgd eps=8"
    assert all(a["wall_seconds"] > 0 for a in results["arms"])
    # --resume keeps the finished arms: nothing is trained again.
    capsys.readouterr()
    vulnerable.main(["--preset", "smoke", "--out", str(out), "--resume", "--no-progress"])
    again = json.loads((out / "results.json").read_text())
    # The arms' records, their wall times included, come back as saved.
    assert again["units"] == results["units"] and again["arms"] == results["arms"]
    # --resume may change --arms (each arm is kept apart): a kept arm is
    # reused as it was, a dropped one left out, a new one trained.
    vulnerable.main(["--preset", "smoke", "--out", str(out), "--resume", "--no-progress",
                     "--arms", "sgd", "dpsgd:eps=8", "clip:max_step=0.1"])
    grown = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in grown["arms"]] == ["sgd", "dpsgd eps=8", "gnq-clip s=0.1"]
    kept = {"sgd", "dpsgd eps=8"}
    assert ([u for u in grown["units"] if u["arm"] in kept]
            == [u for u in results["units"] if u["arm"] in kept])
    assert grown["arms"][:2] == [results["arms"][0], results["arms"][2]]
    assert json.loads((out / "run.json").read_text())["settings"]["arms"] == [
        "sgd", "dpsgd:eps=8", "clip:max_step=0.1"]
    assert (out / "shadow" / grown["arms"][2]["slug"]).is_dir()
    assert [m["arm"] for m in grown["matches"]] == ["gnq-clip s=0.1"]
    # Every other setting must still match.
    with pytest.raises(SystemExit):
        vulnerable.main(["--preset", "smoke", "--out", str(out), "--resume", "--no-progress",
                         "--epochs", "3"])
    assert "config.epochs (saved 2, now 3)" in capsys.readouterr().err


def _arm_row(name, kind, acc, epsilon=None):
    return {"arm": name, "kind": kind, "test_accuracy": acc,
            "test_accuracy_ci": [acc - 0.01, acc + 0.01], "epsilon": epsilon}


def _unit(arm, family, tpr):
    return {"arm": arm, "family": family, "canary_tpr_at_1pct_fpr": tpr,
            "canary_tpr_at_0.1pct_fpr": tpr, "canary_auc": tpr,
            "canary_tpr_at_1pct_fpr_ci": [max(tpr - 0.02, 0.0), min(tpr + 0.02, 1.0)]}


def test_the_verdict_pairs_families_and_is_worse_if_any_family_is_worse():
    """Both arms saturate on dup 8 (their strongest family): compared there
    alone they are not distinguishable. The defense leaks more on the single
    canaries, so the verdict over families is worse; with those equal too it
    is not distinguishable, and better only if better on every family."""
    from experiments.vulnerable import matches, overall_verdict
    arms = [_arm_row("gnq-censor tau=8", "censor", 0.60),
            _arm_row("dpsgd eps=1000", "dpsgd", 0.60, epsilon=1000.0)]
    units = [_unit("gnq-censor tau=8", "mislabel", 0.15), _unit("gnq-censor tau=8", "dup 8", 1.0),
             _unit("dpsgd eps=1000", "mislabel", 0.09), _unit("dpsgd eps=1000", "dup 8", 1.0)]
    (m,) = matches(arms, units)
    assert m["verdict_by_family"] == {"mislabel": "worse", "dup 8": "not distinguishable"}
    assert m["verdict"] == "worse"
    assert m["strongest_family"] == "dup 8" and m["accuracy_matched"]
    assert m["also_matched"] == [{"dpsgd": "dpsgd eps=1000", "epsilon": 1000.0,
                                  "verdict": "worse"}]
    units[0] = _unit("gnq-censor tau=8", "mislabel", 0.09)
    assert matches(arms, units)[0]["verdict"] == "not distinguishable"
    assert overall_verdict({"a": "better", "b": "not distinguishable"}) == "not distinguishable"
    assert overall_verdict({"a": "better", "b": "better"}) == "better"
    assert overall_verdict({"a": "better", "b": "trade-off"}) == "trade-off"
    assert overall_verdict({"a": "trade-off", "b": "worse"}) == "worse"
