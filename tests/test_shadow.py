"""Shadow-model orchestration: resumability, identity checks, models trained
together, and membership inference end to end on the embedded digits."""
import json
import os

import numpy as np
import pytest

from gujax.arms import parse_arm
from gujax.audit.shadow import (ResumeMismatch, ShadowRecord, ShadowSpec, attack, audit_arm,
                                check_shadow_run, load_shadow_record, run_shadow_models)
from gujax.audit.shadow.storage import ShadowStore
from gujax.data import load, random_subset
from gujax.models import MLP
from gujax.train import TrainConfig


@pytest.fixture(scope="module")
def digits():
    return load("digits", "train"), load("digits", "test")


def _tiny(digits, tmp_path, arm="sgd", **kwargs):
    train, test = digits
    args = dict(pool=random_subset(train, 40, 0), population=random_subset(test, 20, 1),
                model=MLP(hidden=(8,)), config=TrainConfig(epochs=1, batch_size=8,
                                                          progress=False),
                num_models=3, workdir=str(tmp_path / "sgd"), seed=0, progress=False)
    args.update(kwargs)
    return run_shadow_models(parse_arm(arm), **args)


def test_record_shapes_and_membership(digits, tmp_path):
    record = _tiny(digits, tmp_path)
    m, n, a, c = record.logits.shape
    assert (m, n, a, c) == (3, 40, 2, 10)
    assert record.population_logits.shape == (3, 20, 2, 10)
    assert record.in_mask.shape == (3, 40) and record.in_mask.dtype == bool
    # The ledger charges members only: OUT examples were never in a batch.
    assert np.all(record.disclosure[~record.in_mask] == 0)
    assert np.all(record.steps_used[~record.in_mask] == 0)
    assert np.all(record.steps_used[record.in_mask] >= 0)
    assert np.all(np.isnan(record.epsilon))          # no DP accounting for sgd
    assert np.all((record.test_accuracy >= 0) & (record.test_accuracy <= 1))


def test_resume_keeps_finished_models_and_is_deterministic(digits, tmp_path):
    first = _tiny(digits, tmp_path)
    workdir = tmp_path / "sgd"
    stamps = {m: os.stat(workdir / f"model_{m:03d}.npz").st_mtime_ns for m in (0, 2)}
    os.remove(workdir / "model_001.npz")             # as if killed while training model 1
    again = _tiny(digits, tmp_path)                  # resume=True by default
    for m, stamp in stamps.items():                  # finished models were not retrained
        assert os.stat(workdir / f"model_{m:03d}.npz").st_mtime_ns == stamp
    np.testing.assert_allclose(again.logits, first.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again.in_mask, first.in_mask)


def _assert_same_record(got, expected, *, wall_seconds=True):
    for field in ShadowRecord._fields:
        a, b = getattr(got, field), getattr(expected, field)
        if field == "wall_seconds" and not wall_seconds:
            continue
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            assert a.dtype == b.dtype, field
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=field)
        elif isinstance(a, np.ndarray):
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)
        else:
            assert a == b, field


def test_record_in_memory_equals_record_read_back(digits, tmp_path):
    """The record is assembled from the models in memory, not re-read: it is
    what ``load_shadow_record`` reads from the workdir, to the bit."""
    record = _tiny(digits, tmp_path, "censor:tau=0.5", models_at_once=2)
    again = load_shadow_record(str(tmp_path / "sgd"), pool=random_subset(digits[0], 40, 0),
                               population=random_subset(digits[1], 20, 1),
                               in_mask=record.in_mask)
    for field in ShadowRecord._fields:
        a, b = getattr(record, field), getattr(again, field)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)
        else:
            assert a == b, field


def test_interrupted_run_resumed_equals_uninterrupted_run(digits, tmp_path, monkeypatch):
    """A run killed after model 0 was saved, called again (as a ``ShadowSpec``)
    trains models 1 and 2 only -- model 1 from the checkpoint its killed
    training left -- and returns the record of a run never interrupted."""
    full = _tiny(digits, tmp_path, workdir=str(tmp_path / "full"))
    workdir = tmp_path / "killed"
    save = ShadowStore.save

    def save_then_die(store, m, model):
        if m == 1:
            raise KeyboardInterrupt("killed while saving model 1")
        save(store, m, model)

    monkeypatch.setattr(ShadowStore, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _tiny(digits, tmp_path, workdir=str(workdir))
    monkeypatch.setattr(ShadowStore, "save", save)
    assert sorted(os.listdir(workdir)) == ["model_000.json", "model_000.npz", "shadow.json",
                                           "training_001-001"]
    stamp = os.stat(workdir / "model_000.npz").st_mtime_ns
    train, test = digits
    spec = ShadowSpec(parse_arm("sgd"), model=MLP(hidden=(8,)),
                      config=TrainConfig(epochs=1, batch_size=8, progress=False),
                      num_models=3, seed=0)
    resumed = run_shadow_models(spec, pool=random_subset(train, 40, 0),
                                population=random_subset(test, 20, 1),
                                workdir=str(workdir), progress=False)
    assert os.stat(workdir / "model_000.npz").st_mtime_ns == stamp   # not retrained
    assert sorted(os.listdir(workdir)) == ["model_000.json", "model_000.npz",
                                           "model_001.json", "model_001.npz",
                                           "model_002.json", "model_002.npz", "shadow.json"]
    _assert_same_record(resumed, full, wall_seconds=False)
    with open(workdir / "model_000.json") as f:                   # model 0 read back
        assert resumed.wall_seconds[0] == json.load(f)["wall_seconds"]


def test_resume_error_names_the_changed_setting(digits, tmp_path):
    _tiny(digits, tmp_path)
    with pytest.raises(ValueError, match=r"config\.epochs \(saved 1, now 2\)"):
        _tiny(digits, tmp_path, config=TrainConfig(epochs=2, batch_size=8, progress=False))
    with pytest.raises(ValueError, match=r"seed \(saved 0, now 1\), pool\.fingerprint"):
        _tiny(digits, tmp_path, seed=1, pool=random_subset(digits[0], 40, 5))


def test_spec_and_arm_keywords_are_exclusive(digits, tmp_path):
    spec = ShadowSpec(parse_arm("sgd"), model=MLP(hidden=(8,)), config=TrainConfig(),
                      num_models=2)
    with pytest.raises(TypeError, match="ShadowSpec"):
        run_shadow_models(spec, pool=digits[0], population=digits[1],
                          workdir=str(tmp_path), num_models=3)


def test_resume_refuses_a_different_run(digits, tmp_path):
    _tiny(digits, tmp_path)
    with pytest.raises(ValueError, match="different run"):
        _tiny(digits, tmp_path, seed=1)
    _tiny(digits, tmp_path, seed=1, resume=False)    # starting over is allowed


@pytest.mark.parametrize("arm", ["censor:tau=0.5", "dpsgd:eps=2"])
def test_models_trained_together_equal_models_trained_alone(digits, tmp_path, arm):
    """``models_at_once=2`` (groups {0, 1} and {2}, one vmapped step per group)
    gives the models ``models_at_once=1`` gives, to float32 rounding: logits,
    ledger and refusals; a model retrained alone after a lost file too."""
    alone = _tiny(digits, tmp_path, arm, workdir=str(tmp_path / "alone"))
    workdir = tmp_path / "together"
    together = _tiny(digits, tmp_path, arm, workdir=str(workdir), models_at_once=2)
    summaries = [json.load(open(workdir / f"model_{m:03d}.json")) for m in range(3)]
    assert [s["trained_with"] for s in summaries] == [[0, 1], [0, 1], [2]]
    assert not [p for p in os.listdir(workdir) if p.startswith("training_")]
    os.remove(workdir / "model_001.npz")             # retrained alone on resume
    resumed = _tiny(digits, tmp_path, arm, workdir=str(workdir), models_at_once=2)
    for record in (together, resumed):
        np.testing.assert_allclose(record.logits, alone.logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(record.disclosure, alone.disclosure, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(record.steps_used, alone.steps_used)
        np.testing.assert_array_equal(record.retired, alone.retired)
        np.testing.assert_array_equal(record.noise_multiplier, alone.noise_multiplier)
    if arm.startswith("censor"):
        assert alone.retired.any()                   # the budget binds
    else:
        assert len(set(alone.noise_multiplier)) == 3  # one sigma per training-set size


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_models=1), "num_models"), (dict(augmentations=("rotate",)), "augmentations"),
    (dict(models_at_once=0), "models_at_once")])
def test_bad_input(digits, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny(digits, tmp_path, **kwargs)


def test_check_shadow_run_finds_what_a_run_would_refuse(digits, tmp_path):
    """Before any training, and writing nothing: a batch larger than a model's
    training set, and a workdir of another run (the setting named)."""
    train, test = digits
    args = dict(pool=random_subset(train, 40, 0), population=random_subset(test, 20, 1),
                model=MLP(hidden=(8,)), num_models=3, seed=0)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="batch_size 30 exceeds the .* smallest shadow"):
        check_shadow_run(parse_arm("sgd"), config=TrainConfig(batch_size=30),
                         workdir=str(fresh), **args)
    check_shadow_run(parse_arm("sgd"), config=TrainConfig(batch_size=8), workdir=str(fresh),
                     **args)
    assert not fresh.exists()
    _tiny(digits, tmp_path)
    with pytest.raises(ResumeMismatch, match=r"config\.epochs \(saved 1, now 2\)") as info:
        check_shadow_run(parse_arm("sgd"), config=TrainConfig(epochs=2, batch_size=8),
                         workdir=str(tmp_path / "sgd"), **args)
    assert info.value.changes == ["config.epochs (saved 1, now 2)"]


def test_step_bar_of_the_group_in_training(digits, tmp_path, capsys):
    """With ``config.progress`` the trainer's step bar runs for each group, and
    the models bar names the group."""
    _tiny(digits, tmp_path, models_at_once=3, progress=True,
          config=TrainConfig(epochs=1, batch_size=8, progress=True))
    err = capsys.readouterr().err
    assert "train x3" in err and "training models 0-2" in err


def test_attack_rejects_unrecorded_queries(digits, tmp_path):
    record = _tiny(digits, tmp_path, augmentations=("identity",))
    with pytest.raises(ValueError, match="augmentations"):
        attack(record, augmentations=("flip",))


@pytest.mark.slow  # 86 s on 2 cores: out of CI (conftest), run locally
def test_lira_finds_members_of_an_overfit_model_and_not_under_dp(digits, tmp_path):
    """Issue 5's end-to-end check. A wide MLP overfits 150 digits (each model
    trains on a random half of a 300-example pool): online LiRA clearly beats
    chance, and beats the loss attack at low FPR. DP-SGD at epsilon = 1 on the
    same data leaves LiRA near chance."""
    train, test = digits
    common = dict(pool=random_subset(train, 300, 0), population=random_subset(test, 150, 1),
                  model=MLP(hidden=(256,)), num_models=8, seed=0, progress=False,
                  attack_augmentations=("identity",), models_at_once=8)
    config = TrainConfig(epochs=40, batch_size=32, learning_rate=0.2, progress=False)
    _, plain = audit_arm(parse_arm("sgd"), config=config,
                         workdir=str(tmp_path / "sgd"), **common)
    lira, loss = plain.evaluations["lira_online"], plain.evaluations["loss"]
    print(f"sgd: LiRA AUC {lira.auc:.3f} TPR@1% {lira.tpr_at(0.01):.3f}; "
          f"loss AUC {loss.auc:.3f} TPR@1% {loss.tpr_at(0.01):.3f}")
    assert lira.auc > 0.6
    assert lira.tpr_at(0.01) > loss.tpr_at(0.01)
    assert lira.tpr_at(0.01) > 0.03                     # 3x chance at 1% FPR

    # Under DP the AUC of 8 models on 300 examples varies from seed to seed by
    # more than the +-0.05 asserted below (0.447, 0.511, 0.502, 0.489 for
    # seeds 0-3, measured 2026-12-02), so the private arm trains 16.
    _, private = audit_arm(parse_arm("dpsgd:eps=1"), config=config,
                           workdir=str(tmp_path / "dpsgd"), **dict(common, num_models=16))
    dp = private.evaluations["lira_online"]
    print(f"dpsgd eps=1: LiRA AUC {dp.auc:.3f} TPR@1% {dp.tpr_at(0.01):.3f}")
    assert abs(dp.auc - 0.5) < 0.05
    assert dp.auc < lira.auc - 0.1
