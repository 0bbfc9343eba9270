"""Training arms: parsing, calibration, and the ghost engine against the explicit one."""
import dataclasses

import jax
import numpy as np
import pytest
from conftest import assert_trees_close

from gujax.arms import Arm, build_pipeline, dp_calibration, ledger, parse_arm
from gujax.data import random_crop_flip
from gujax.models import MLP, SmallCNN
from gujax.privacy import dp_epsilon
from gujax.train import TrainConfig, softmax_cross_entropy, train, train_stacked


def test_parse_arm_aliases_and_defaults():
    arm = parse_arm("censor:tau=4,lr=0.05", reg=0.3)
    assert arm == Arm(kind="censor", budget=4.0, reg=0.3, learning_rate=0.05)
    assert parse_arm("dpsgd:eps=3").epsilon == 3.0
    assert parse_arm("clip:max_step=0.1,relative=false").relative is False
    assert parse_arm("sgd").name == "sgd"
    assert parse_arm("censor:tau=2,reg=0.5").name == "gnq-censor tau=2 reg=0.5"


@pytest.mark.parametrize("text, match", [
    ("adam", "arm kind"), ("censor", "needs budget"), ("dpsgd:eps=0", "epsilon"),
    ("clip:max_step=-1", "max_step"), ("sgd:foo=1", "bad arm option"),
    ("sgd:reg=abc", "bad value"), ("dpsgd:eps=1,delta=2", "delta")])
def test_parse_arm_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_arm(text)


def test_dp_calibration_meets_the_target():
    sigma, eps = dp_calibration(3.0, 1e-5, 64 / 700, 100)
    assert eps <= 3.0 + 1e-6 and eps > 2.9
    assert dp_epsilon(sigma * 0.97, 64 / 700, 100, 1e-5) > 3.0


def test_build_pipeline_rejects_bad_sizes_and_methods():
    loss = softmax_cross_entropy(MLP(hidden=(4,)))
    with pytest.raises(ValueError, match="batch_size"):
        build_pipeline(parse_arm("sgd"), loss_fn=loss, train_size=10, batch_size=20,
                       epochs=1, seed=0)
    with pytest.raises(ValueError, match="method"):
        build_pipeline(parse_arm("sgd"), loss_fn=loss, train_size=10, batch_size=5,
                       epochs=1, seed=0, method="fast")


def _run(arm_text, method, model, images, labels, num_examples):
    rows = np.arange(0, len(images), 2)             # train on every other pool example
    loss = softmax_cross_entropy(model)
    arm = parse_arm(arm_text)
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=0.1, seed=3,
                         progress=False)
    pipe = build_pipeline(arm, loss_fn=loss, train_size=len(rows),
                          batch_size=config.batch_size, epochs=config.epochs, seed=1,
                          num_examples=num_examples, method=method)
    params = model.init(jax.random.key(0), images[:1].astype(np.float32) / 255)["params"]
    result = train(params=params, stage=pipe.stage,
                   data=(images[rows], labels[rows], rows),
                   config=dataclasses.replace(config, sampling=pipe.sampling), model=model)
    return result, pipe


@pytest.mark.parametrize("arm_text", ["sgd", "censor:tau=0.3", "clip:max_step=0.02",
                                      "dpsgd:eps=4"])
@pytest.mark.parametrize("model", [MLP(hidden=(16,), num_classes=3),
                                   SmallCNN(num_classes=3, widths=(4, 8), groups=2)],
                         ids=["mlp", "cnn"])
def test_ghost_engine_trains_like_the_explicit_one(arm_text, model):
    """The default (ghost) engine reproduces the explicit vmap(grad) run: same
    parameters, same ledger, same refusals, to float32 rounding."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 48).astype(np.int32)
    ghost, pipe = _run(arm_text, "ghost", model, images, labels, 48)
    explicit, _ = _run(arm_text, "explicit", model, images, labels, 48)
    if arm_text.startswith("dpsgd"):
        assert pipe.noise_multiplier > 0 and pipe.epsilon <= 4.0 + 1e-6
    assert_trees_close(ghost.params, explicit.params, rtol=2e-4, atol=2e-5)
    lg, le = ledger(ghost.aggregator_state), ledger(explicit.aggregator_state)
    np.testing.assert_allclose(lg.disclosure, le.disclosure, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(lg.steps_used, le.steps_used)
    np.testing.assert_array_equal(lg.retired, le.retired)
    assert np.all(np.asarray(lg.disclosure)[1::2] == 0)     # never trained on
    if arm_text.startswith("censor"):
        assert np.asarray(lg.retired).any()                  # the budget binds here


def _pipelines(arm_text, method, model, images, subsets, num_examples, config):
    loss = softmax_cross_entropy(model)
    runs = []
    for m, rows in enumerate(subsets):
        pipe = build_pipeline(parse_arm(arm_text), loss_fn=loss, train_size=len(rows),
                              batch_size=config.batch_size, epochs=config.epochs,
                              seed=10 + m, num_examples=num_examples, method=method)
        params = model.init(jax.random.key(m), images[:1].astype(np.float32) / 255)["params"]
        runs.append((pipe, params, dataclasses.replace(config, seed=20 + m,
                                                       sampling=pipe.sampling)))
    return loss, runs


@pytest.mark.parametrize("arm_text, method", [
    ("sgd", "ghost"), ("censor:tau=0.3", "ghost"), ("clip:max_step=0.02", "ghost"),
    ("dpsgd:eps=4", "ghost"), ("censor:tau=0.3", "explicit"), ("dpsgd:eps=4", "explicit")])
def test_stacked_runs_train_like_separate_ones(arm_text, method):
    """M runs vmapped into one step (``train_stacked``, what shadow models use)
    follow the trajectories ``train`` gives each alone: runs of different
    sizes (so different step counts and Poisson padding), seeds (batches and
    augmentation keys), inits and DP-SGD sigmas; same parameters, ledger and
    refusals to float32 rounding."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 60).astype(np.int32)
    subsets = [np.sort(rng.choice(60, size, replace=False)) for size in (30, 26, 37)]
    model = MLP(hidden=(16,), num_classes=3)
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=0.1, momentum=0.5,
                         augment=random_crop_flip, progress=False)
    loss, runs = _pipelines(arm_text, method, model, images, subsets, 60, config)
    data = [(images[rows], labels[rows], rows) for rows in subsets]
    stacked = train_stacked(
        params=[p for _, p, _ in runs], stage=runs[0][0].stage, data=data,
        configs=[c for _, _, c in runs],
        stage_states=[pipe.stage.init(p) for pipe, p, _ in runs], model=model)
    if arm_text.startswith("dpsgd"):                 # sizes differ, so do the sigmas
        assert len({pipe.noise_multiplier for pipe, _, _ in runs}) == 3
    for (pipe, params, cfg), d, together in zip(runs, data, stacked):
        alone = train(params=params, stage=pipe.stage, data=d, config=cfg, model=model)
        assert_trees_close(together.params, alone.params, rtol=2e-4, atol=2e-5)
        la, lt = ledger(alone.aggregator_state), ledger(together.aggregator_state)
        np.testing.assert_allclose(lt.disclosure, la.disclosure, rtol=2e-4, atol=1e-6)
        np.testing.assert_array_equal(lt.steps_used, la.steps_used)
        np.testing.assert_array_equal(lt.retired, la.retired)
        assert [r["step"] for r in together.history] == [r["step"] for r in alone.history]
        np.testing.assert_allclose([r["loss"] for r in together.history],
                                   [r["loss"] for r in alone.history], rtol=1e-4)
