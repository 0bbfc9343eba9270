"""Shadow-model orchestration: resumability, identity checks, models trained
together, and membership inference end to end on the embedded digits."""
import json
import os

import numpy as np
import pytest

from gujax.arms import parse_arm
from gujax.audit.shadow import attack, audit_arm, run_shadow_models
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


def test_attack_rejects_unrecorded_queries(digits, tmp_path):
    record = _tiny(digits, tmp_path, augmentations=("identity",))
    with pytest.raises(ValueError, match="augmentations"):
        attack(record, augmentations=("flip",))


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
    print(f"sgd: LiRA AUC {lira.auc:.3f} TPR@1% {lira.tpr_at_fpr[1]:.3f}; "
          f"loss AUC {loss.auc:.3f} TPR@1% {loss.tpr_at_fpr[1]:.3f}")
    assert lira.auc > 0.6
    assert lira.tpr_at_fpr[1] > loss.tpr_at_fpr[1]
    assert lira.tpr_at_fpr[1] > 0.03                     # 3x chance at 1% FPR

    _, private = audit_arm(parse_arm("dpsgd:eps=1"), config=config,
                           workdir=str(tmp_path / "dpsgd"), **common)
    dp = private.evaluations["lira_online"]
    print(f"dpsgd eps=1: LiRA AUC {dp.auc:.3f} TPR@1% {dp.tpr_at_fpr[1]:.3f}")
    assert abs(dp.auc - 0.5) < 0.05
    assert dp.auc < lira.auc - 0.1
