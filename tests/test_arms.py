"""Training arms: parsing, calibration, and the ghost engine against the explicit one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close

from gujax.arms import (ARM_KINDS, Arm, ArmKind, Option, TrainingRun, dp_calibration, parse_arm,
                        register, train_runs, unregister)
from gujax.data import random_crop_flip
from gujax.models import MLP, SmallCNN
from gujax.privacy import dp_epsilon
from gujax.policies import Policy, mean_policy
from gujax.train import TrainConfig


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
    assert dp_epsilon(sigma * 0.97, 64 / 700, 100, 1e-5, sampling="poisson") > 3.0


def _init(model, images, seed):
    return model.init(jax.random.key(seed), images[:1].astype(np.float32) / 255)["params"]


def test_train_runs_rejects_bad_sizes_and_methods():
    model = MLP(hidden=(4,), num_classes=3)
    images = np.zeros((10, 8, 8, 1), np.uint8)
    run = TrainingRun((images, np.zeros(10, np.int32), np.arange(10)), 0, _init(model, images, 0))
    config = TrainConfig(epochs=1, batch_size=20, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_runs(parse_arm("sgd"), [run], config, model=model)
    with pytest.raises(ValueError, match="method"):
        train_runs(parse_arm("sgd"), [run], dataclasses.replace(config, batch_size=5),
                   model=model, method="fast")
    with pytest.raises(ValueError, match="num_examples"):
        train_runs(parse_arm("sgd"), [run], dataclasses.replace(config, batch_size=5),
                   model=model, num_examples=5)
    with pytest.raises(ValueError, match="one or more"):
        train_runs(parse_arm("sgd"), [], config, model=model)


def _run(arm_text, method, model, images, labels, num_examples):
    rows = np.arange(0, len(images), 2)             # train on every other pool example
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=0.1, seed=3, progress=False)
    (run,) = train_runs(parse_arm(arm_text),
                        [TrainingRun((images[rows], labels[rows], rows), 1,
                                     _init(model, images, 0))],
                        config, model=model, num_examples=num_examples, method=method)
    return run


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
    ghost = _run(arm_text, "ghost", model, images, labels, 48)
    explicit = _run(arm_text, "explicit", model, images, labels, 48)
    if arm_text.startswith("dpsgd"):
        assert ghost.noise_multiplier > 0 and ghost.epsilon <= 4.0 + 1e-6
        assert ghost.config.sampling == "poisson"
    assert_trees_close(ghost.params, explicit.params, rtol=2e-4, atol=2e-5)
    lg, le = ghost.ledger, explicit.ledger
    np.testing.assert_allclose(lg.disclosure, le.disclosure, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(lg.steps_used, le.steps_used)
    np.testing.assert_array_equal(lg.retired, le.retired)
    assert np.all(np.asarray(lg.disclosure)[1::2] == 0)     # never trained on
    if arm_text.startswith("censor"):
        assert np.asarray(lg.retired).any()                  # the budget binds here


@pytest.mark.parametrize("arm_text, method", [
    ("sgd", "ghost"), ("censor:tau=0.3", "ghost"), ("clip:max_step=0.02", "ghost"),
    ("dpsgd:eps=4", "ghost"), ("dpsgd:eps=4,ledger=false", "ghost"),
    ("censor:tau=0.3", "explicit"), ("dpsgd:eps=4", "explicit")])
def test_stacked_runs_train_like_separate_ones(arm_text, method):
    """``train_runs`` with M runs vmapped into one step (what shadow models
    and canary runs use) follows the trajectories each run gives alone: runs
    of different sizes (so different step counts, Poisson padding and DP-SGD
    sigmas), seeds and inits; same parameters, ledger and refusals to
    float32 rounding."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 60).astype(np.int32)
    subsets = [np.sort(rng.choice(60, size, replace=False)) for size in (30, 26, 37)]
    model = MLP(hidden=(16,), num_classes=3)
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=0.1, momentum=0.5,
                         augment=random_crop_flip, progress=False)
    arm = parse_arm(arm_text)
    runs = [TrainingRun((images[rows], labels[rows], rows), 20 + m, _init(model, images, m))
            for m, rows in enumerate(subsets)]
    stacked = train_runs(arm, runs, config, model=model, num_examples=60, method=method)
    if arm.kind == "dpsgd":                          # sizes differ, so do the sigmas
        assert len({r.noise_multiplier for r in stacked}) == 3
    for run, together in zip(runs, stacked):
        (alone,) = train_runs(arm, [run], config, model=model, num_examples=60, method=method)
        assert (alone.noise_multiplier, alone.epsilon) == (together.noise_multiplier,
                                                           together.epsilon)
        assert_trees_close(together.params, alone.params, rtol=2e-4, atol=2e-5)
        if arm.ledger is False:
            assert together.ledger is None and alone.ledger is None
        else:
            la, lt = alone.ledger, together.ledger
            # The clip policy stops anywhere in its band (0.999 of the cap to
            # the cap): rounding can end it one round apart, 1e-3 of D.
            rtol = 1e-3 if arm.kind == "clip" else 2e-4
            np.testing.assert_allclose(lt.disclosure, la.disclosure, rtol=rtol, atol=1e-6)
            np.testing.assert_array_equal(lt.steps_used, la.steps_used)
            np.testing.assert_array_equal(lt.retired, la.retired)
        assert [r["step"] for r in together.history] == [r["step"] for r in alone.history]
        np.testing.assert_allclose([r["loss"] for r in together.history],
                                   [r["loss"] for r in alone.history], rtol=1e-4)


@pytest.mark.parametrize("ledger", [True, False])
def test_stacked_dpsgd_runs_draw_their_own_calibrated_noise(ledger):
    """The defect this guards against: a stage shared by stacked runs drew
    every run's noise at the first run's sigma. Two DP-SGD runs of 100 and
    400 examples (calibrated sigmas about 2.3 and 1.4) train together on a
    loss whose gradient is exactly zero, so each update is the noise alone,
    N(0, sigma^2 C^2) / B per coordinate, and after T steps of SGD at lr 1
    every parameter has moved by N(0, T sigma^2 C^2 / B^2). The measured
    standard deviation over 20,000 parameters (relative standard error
    0.5%) must be within 3% of each run's own sigma, and more than 3% away
    from the other run's."""
    def zero_loss(params, example):
        return 0.0 * (jnp.sum(params["w"]) + jnp.sum(example["x"]))

    batch, clip = 20, 0.5
    arm = parse_arm(f"dpsgd:eps=2,clip_norm={clip},ledger={str(ledger).lower()}")
    runs = [TrainingRun({"x": np.zeros((n, 1), np.float32), "id": np.arange(n)}, 7 + n,
                        {"w": jnp.zeros(20_000)}) for n in (100, 400)]
    config = TrainConfig(epochs=3, batch_size=batch, learning_rate=1.0, progress=False)
    trained = train_runs(arm, runs, config, loss_fn=zero_loss, method="explicit")
    sigmas = [t.noise_multiplier for t in trained]
    assert sigmas[0] > 1.3 * sigmas[1]
    for t, run, other in zip(trained, runs, sigmas[::-1]):
        steps = config.epochs * (len(run.data["id"]) // batch)
        measured = float(np.std(np.asarray(t.params["w"]))) * batch / (clip * np.sqrt(steps))
        assert abs(measured / t.noise_multiplier - 1) < 0.03, (measured, t.noise_multiplier)
        assert abs(measured / other - 1) > 0.03
        assert float(t.stage_state.noise_multiplier) == pytest.approx(t.noise_multiplier)
        assert (t.ledger is not None) == ledger


def _toy_policy(arm, size) -> Policy:
    """Plain SGD with every gradient scaled by ``arm.scale`` (a toy kind)."""
    mean = mean_policy()

    def weights(stats, example_ids, mask, state):
        w, state = mean.weights(stats, example_ids, mask, state)
        return arm.scale * w, state
    return mean._replace(weights=weights)


@pytest.fixture
def toy_kind():
    kind = register(ArmKind(
        "toy", "SGD with the gradient scaled by s", "toy:s=0.5",
        (Option("scale", float, "the factor", alias="s", required=True),),
        lambda arm: f"toy s={arm.scale:g}", _toy_policy))
    yield kind
    unregister("toy")


def test_a_kind_registered_in_a_test_trains_through_parse_arm_and_the_harness(toy_kind):
    """One ``register`` call makes a kind: parsing, labels, the harness's
    arms and training all come from the registry entry."""
    from experiments import cli, harness
    assert "toy" in ARM_KINDS
    arm = parse_arm("toy:s=0.5,lr=0.2")
    assert arm == Arm("toy", scale=0.5, learning_rate=0.2) and arm.name == "toy s=0.5 lr=0.2"
    with pytest.raises(ValueError, match="needs scale"):
        parse_arm("toy")
    settings = cli.Settings(epochs=1, batch_size=8, progress=False)
    assert cli.make_arm("toy:s=0.5", settings) == Arm("toy", scale=0.5)
    assert cli.arm_text("toy:s=2") == "toy:s=2"
    model = MLP(hidden=(8,), num_classes=3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 32).astype(np.int32)
    half, = harness.train_arm(parse_arm("toy:s=0.5"), settings, model, [(images, labels)], [0])
    full, = harness.train_arm(parse_arm("toy:s=1"), settings, model, [(images, labels)], [0])
    init = _init(model, images, 0)
    # One SGD step per batch: a half-scaled gradient moves the first step half as far.
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a - b)).sum(),
                                   half.params, init)
    moved_full = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a - b)).sum(),
                                        full.params, init)
    assert 0 < sum(jax.tree_util.tree_leaves(moved)) < sum(jax.tree_util.tree_leaves(moved_full))
    assert half.ledger is None and half.noise_multiplier is None


def test_train_runs_is_the_one_place_that_trains_an_arm():
    """The claim in gujax.arms' docstring, held: outside the trainer itself,
    only ``gujax.arms.train_runs`` calls ``train_stacked`` (or ``train``) in
    the library and the experiments, and nothing builds a policy stage for
    an arm elsewhere (``spec.policy(`` appears in gujax/arms.py alone)."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parent.parent
    callers, policy_builders = set(), set()
    for path in [*root.glob("gujax/**/*.py"), *root.glob("experiments/*.py")]:
        rel = str(path.relative_to(root))
        code = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith(("#", '"', "'")))
        if rel != "gujax/train.py" and re.search(r"(?<![\w.])train_stacked\(|train\.train\(", code):
            callers.add(rel)
        if re.search(r"\.policy\(arm, ", code):
            policy_builders.add(rel)
    assert callers == {"gujax/arms.py"}, callers
    assert policy_builders == {"gujax/arms.py"}, policy_builders
