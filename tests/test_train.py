"""The trainer: plumbing against a hand-written step, determinism, resume."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gujax.train as train_module
from conftest import assert_trees_close
from gujax.dpsgd import dpsgd_aggregate
from gujax.noise import Noise
from gujax.engine import Stage
from gujax.transforms import gnq_censor, mean_aggregate
from gujax.train import TrainConfig, evaluate, softmax_cross_entropy, train
from gujax.workdir import to_saveable

N = 48


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def make_data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 3, 1)).astype(np.float32)
    y = (x[:, 0, 0, 0] > 0).astype(np.int32) + (x[:, 1, 1, 0] > 1).astype(np.int32)
    return x, y, np.arange(n, dtype=np.int32)


@pytest.fixture(scope="module")
def setup():
    model = Tiny()
    data = make_data()
    params = model.init(jax.random.key(0), data[0][:1])["params"]
    return model, params, data


def leaves_equal(a, b):
    a, b = to_saveable(a), to_saveable(b)  # PRNG keys
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def config(**kw):
    base = dict(epochs=2, batch_size=12, learning_rate=0.1, checkpoint_every=3,
                progress=False)
    return TrainConfig(**{**base, **kw})


def test_one_step_is_sgd_on_the_batch_mean_gradient(setup):
    model, params, data = setup
    cfg = config(epochs=1, batch_size=N)  # one step, the whole (shuffled) set
    result = train(params=params, aggregator=mean_aggregate(), data=data, config=cfg,
                   model=model)
    loss = softmax_cross_entropy(model)
    batch_loss = lambda p: jnp.mean(jax.vmap(loss, (None, 0))(
        p, {"image": jnp.asarray(data[0]), "label": jnp.asarray(data[1])}))
    grad = jax.grad(batch_loss)(params)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grad)
    assert_trees_close(result.params, expected, rtol=1e-5, atol=1e-6)


def test_uint8_images_are_scaled(setup):
    model, params, _ = setup
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(N, 3, 3, 1), dtype=np.uint8)
    y, ids = make_data()[1:]
    cfg = config(epochs=1, batch_size=N)
    a = train(params=params, aggregator=mean_aggregate(), data=(raw, y, ids), config=cfg,
              model=model)
    b = train(params=params, aggregator=mean_aggregate(),
              data=(raw.astype(np.float32) / 255, y, ids), config=cfg, model=model)
    assert_trees_close(a.params, b.params, rtol=1e-6, atol=1e-7)


def arms(num_examples=N):
    return {
        "censor": (gnq_censor(budget=1.5, num_examples=num_examples, reg=0.1), "shuffle"),
        "dpsgd": (dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0,
                                  expected_batch_size=12, seed=5), "poisson"),
        "dpsgd-rbg": (dpsgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0,
                                      expected_batch_size=12, seed=5, noise=Noise("rbg")), "poisson"),
    }


@pytest.mark.parametrize("arm", ["censor", "dpsgd", "dpsgd-rbg"])
def test_same_seed_same_result_and_killed_run_resumes_identically(setup, arm, tmp_path,
                                                                  metric_records):
    model, params, data = setup
    aggregator, sampling = arms()[arm]
    cfg = config(sampling=sampling)
    whole = tmp_path / "whole"
    ref = train(params=params, aggregator=aggregator, data=data, config=cfg, model=model,
                eval_data=data[:2], workdir=str(whole))
    again = train(params=params, aggregator=aggregator, data=data, config=cfg, model=model,
                  eval_data=data[:2])
    leaves_equal(ref.params, again.params)
    leaves_equal(ref.stage_state, again.stage_state)

    # Kill after 5 steps (checkpoints every 3): the process dies mid-run.
    killed = tmp_path / "killed"
    metric_records.die_after(5)
    with pytest.raises(KeyboardInterrupt):
        train(params=params, aggregator=aggregator, data=data, config=cfg, model=model,
              eval_data=data[:2], workdir=str(killed))
    assert sorted(os.listdir(killed / "checkpoints")) == ["3"]

    # Resume: only steps 4..8 run again (counted by their metric records).
    written = metric_records.count()
    resumed = train(params=params, aggregator=aggregator, data=data, config=cfg,
                    model=model, eval_data=data[:2], workdir=str(killed))
    assert written == [4, 5, 6, 7, 8]
    leaves_equal(resumed.params, ref.params)
    leaves_equal(resumed.stage_state, ref.stage_state)
    assert resumed.history == ref.history and len(ref.history) == 2
    for name in ("metrics.jsonl", "history.jsonl"):
        assert (killed / name).read_text() == (whole / name).read_text()
    records = [json.loads(l) for l in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    if arm == "censor":
        assert np.any(np.asarray(ref.stage_state.disclosure) > 0)
    # A finished run resumes to itself without training.
    done = train(params=params, aggregator=aggregator, data=data, config=cfg, model=model,
                 eval_data=data[:2], workdir=str(whole))
    leaves_equal(done.params, ref.params)


def test_different_seed_changes_the_run(setup):
    model, params, data = setup
    a = train(params=params, aggregator=mean_aggregate(), data=data, config=config(seed=0),
              model=model)
    b = train(params=params, aggregator=mean_aggregate(), data=data, config=config(seed=1),
              model=model)
    assert not np.allclose(a.params["Dense_0"]["kernel"], b.params["Dense_0"]["kernel"])


def test_replaceable_gradient_stage(setup):
    model, params, data = setup

    def frozen_stage(p, batch, stage_state):
        return jax.tree_util.tree_map(jnp.zeros_like, p), stage_state, {"ids": batch["id"].sum()}

    result = train(params=params, stage=Stage(mean_aggregate().init, frozen_stage), data=data,
                   config=config(epochs=1), model=model)
    leaves_equal(result.params, params)
    assert "ids" in result.history[-1]


def test_training_reduces_loss_and_evaluates(setup):
    model, params, data = setup
    result = train(params=params, aggregator=mean_aggregate(), data=data,
                   config=config(epochs=6, optimizer="adam", learning_rate=0.05),
                   model=model, eval_data=data[:2])
    first = evaluate(model, params, data[0], data[1])
    assert result.history[-1]["eval_loss"] < 0.7 * first["eval_loss"]
    assert 0 <= result.history[-1]["eval_accuracy"] <= 1
    assert [h["epoch"] for h in result.history] == list(range(1, 7))


def test_bad_input_is_rejected(setup, tmp_path):
    model, params, (x, y, ids) = setup
    agg = mean_aggregate()
    with pytest.raises(ValueError, match="one N"):
        train(params=params, aggregator=agg, data=(x, y[:-1], ids), config=config(),
              model=model)
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train(params=params, aggregator=agg, data=(bad, y, ids), config=config(), model=model)
    with pytest.raises(ValueError, match="integers"):
        train(params=params, aggregator=agg, data=(x, y.astype(float), ids), config=config(),
              model=model)
    with pytest.raises(ValueError, match="exceeds"):
        train(params=params, aggregator=agg, data=(x, y, ids), config=config(batch_size=99),
              model=model)
    with pytest.raises(ValueError, match="loss_fn"):
        train(params=params, aggregator=agg, data=(x, y, ids), config=config())
    for kw in [dict(optimizer="rmsprop"), dict(sampling="random"), dict(epochs=0),
               dict(learning_rate=-1.0), dict(momentum=1.0)]:
        with pytest.raises(ValueError):
            config(**kw)
    # Resuming a workdir with another config is refused.
    train(params=params, aggregator=agg, data=(x, y, ids), config=config(epochs=1),
          model=model, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="different config"):
        train(params=params, aggregator=agg, data=(x, y, ids),
              config=config(epochs=1, learning_rate=0.5), model=model, workdir=str(tmp_path))


@pytest.mark.parametrize("arm", ["censor", "dpsgd"])
def test_stacked_runs_resume_identically_after_a_kill(setup, arm, tmp_path, metric_records):
    """``train_stacked`` of two runs (8 and 4 steps) killed at step 7, after the
    short run finished: the resumed stack ends where an uninterrupted one does,
    and each run equals ``train`` alone."""
    model, params, data = setup
    aggregator, sampling = arms()[arm]
    short = tuple(a[:30] for a in data)
    other = model.init(jax.random.key(1), data[0][:1])["params"]
    kwargs = dict(params=[params, other], aggregator=aggregator, data=[data, short],
                  configs=[config(sampling=sampling), config(sampling=sampling, seed=4)],
                  model=model)
    whole = train_module.train_stacked(**kwargs, workdir=str(tmp_path / "whole"))
    for result, p, d, seed in zip(whole, (params, other), (data, short), (0, 4)):
        alone = train(params=p, aggregator=aggregator, data=d, model=model,
                      config=config(sampling=sampling, seed=seed))
        assert_trees_close(result.params, alone.params, rtol=1e-5, atol=1e-6)
        assert [r["step"] for r in result.history] == [r["step"] for r in alone.history]

    metric_records.die_after(7)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_module.train_stacked(**kwargs, workdir=str(killed))
    assert sorted(os.listdir(killed / "checkpoints")) == ["3", "6"]
    written = metric_records.count()
    resumed = train_module.train_stacked(**kwargs, workdir=str(killed))
    assert written == [7, 8]
    for a, b in zip(whole, resumed):
        leaves_equal(a.params, b.params)
        leaves_equal(a.stage_state, b.stage_state)
        assert a.history == b.history
    for name in ("metrics.jsonl", "history.jsonl"):
        assert (killed / name).read_text() == (tmp_path / "whole" / name).read_text()
    last = json.loads((killed / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and last["loss"][1] is None     # the short run had finished


def test_stacked_bad_input_is_rejected(setup):
    model, params, data = setup
    agg = mean_aggregate()
    stacked = train_module.train_stacked
    with pytest.raises(ValueError, match="seed alone"):
        stacked(params=[params, params], aggregator=agg, data=[data, data],
                configs=[config(), config(learning_rate=0.5)], model=model)
    with pytest.raises(ValueError, match="one params, data and config"):
        stacked(params=[params], aggregator=agg, data=[data, data],
                configs=[config(), config()], model=model)
    with pytest.raises(ValueError, match="differ in shape"):
        stacked(params=[params, params], aggregator=agg,
                data=[data, (data[0][:, :2], data[1], data[2])], configs=[config(), config()],
                model=model)
    with pytest.raises(ValueError, match=r"data\[1\] is empty"):
        stacked(params=[params, params], aggregator=agg,
                data=[data, tuple(a[:0] for a in data)], configs=[config(), config()],
                model=model)


def test_snapshots_are_the_parameters_of_shorter_runs_and_survive_a_resume(setup, tmp_path,
                                                                            metric_records):
    model, params, data = setup
    cfg = config(epochs=3)
    result = train(params=params, aggregator=mean_aggregate(), data=data, config=cfg,
                   model=model, snapshot_epochs=(1, 3), workdir=str(tmp_path / "a"))
    assert sorted(result.snapshots) == [1, 3]
    leaves_equal(result.snapshots[3], result.params)
    one = train(params=params, aggregator=mean_aggregate(), data=data, config=config(epochs=1),
                model=model)
    leaves_equal(result.snapshots[1], one.params)
    # Killed in epoch 2 (after the epoch-1 snapshot and the checkpoint at step 6):
    # the resumed run still returns the epoch-1 snapshot.
    metric_records.die_after(7)
    with pytest.raises(KeyboardInterrupt):
        train(params=params, aggregator=mean_aggregate(), data=data, config=cfg, model=model,
              snapshot_epochs=(1, 3), workdir=str(tmp_path / "b"))
    metric_records.count()
    resumed = train(params=params, aggregator=mean_aggregate(), data=data, config=cfg,
                    model=model, snapshot_epochs=(1, 3), workdir=str(tmp_path / "b"))
    for epoch in (1, 3):
        leaves_equal(resumed.snapshots[epoch], result.snapshots[epoch])
    with pytest.raises(ValueError, match="snapshot_epochs"):
        train(params=params, aggregator=mean_aggregate(), data=data, config=cfg, model=model,
              snapshot_epochs=(4,))


def test_any_batch_schema_trains_like_images_and_labels(setup):
    """A dict of arrays with an "id" entry (here a sequence model's schema)
    reaches the loss under its own keys; the run equals the (images, labels,
    ids) run with the same loss."""
    model, params, (x, y, ids) = setup
    image_loss = softmax_cross_entropy(model)

    def token_loss(p, example):
        return image_loss(p, {"image": example["tokens"], "label": example["target"]})

    cfg = config(epochs=1)
    from gujax.engine import ghost_engine, make_stage
    from gujax.policies import monitor_policy
    policy = monitor_policy(num_examples=N, reg=0.1)
    a = train(params=params, stage=make_stage(ghost_engine(image_loss), policy),
              data=(x, y, ids), config=cfg)
    b = train(params=params, stage=make_stage(ghost_engine(token_loss), policy),
              data={"tokens": x, "target": y, "id": ids}, config=cfg)
    leaves_equal(a.params, b.params)
    leaves_equal(a.stage_state, b.stage_state)
    with pytest.raises(ValueError, match="'id'"):
        train(params=params, stage=make_stage(ghost_engine(token_loss), policy),
              data={"tokens": x, "target": y}, config=cfg)
    with pytest.raises(ValueError, match="exactly one"):
        train(params=params, data=(x, y, ids), config=cfg, model=model)


def test_train_and_a_stack_of_one_write_the_same_run_folder(setup, tmp_path):
    """``train`` is ``train_stacked`` with M = 1: the same files, byte for
    byte (config.json, metrics.jsonl, history.jsonl), and the same run."""
    model, params, data = setup
    cfg = config(checkpoint_every=3)
    one = train(params=params, aggregator=mean_aggregate(), data=data, config=cfg,
                model=model, eval_data=data[:2], workdir=str(tmp_path / "one"))
    (stack,) = train_module.train_stacked(params=[params], aggregator=mean_aggregate(), data=[data],
                             configs=[cfg], model=model, eval_data=data[:2],
                             workdir=str(tmp_path / "stack"))
    for name in ("config.json", "metrics.jsonl", "history.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "stack" / name).read_text()
    leaves_equal(one.params, stack.params)
    assert one.history == stack.history


def test_negative_labels_are_refused_where_data_enters_the_trainer(setup):
    model, params, (images, labels, ids) = setup
    bad = np.array(labels).copy()
    bad[3] = -1
    with pytest.raises(ValueError, match="labels must be >= 0.*-1 at row 3"):
        train(params=params, aggregator=mean_aggregate(), data=(images, bad, ids),
              config=config(), model=model)
