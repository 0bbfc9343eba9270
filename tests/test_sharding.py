"""Batch sharded over 4 (virtual CPU) devices: the same results as on one device.

The device count must be fixed before JAX initialises, so the checks run in a
fresh interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
and report their errors as JSON on the last line of stdout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec
    from gujax import sharding, transforms
    from gujax.dpsgd import dpsgd_aggregate
    from gujax.ghost.kernels import ghost_gnq
    from gujax.engine import ghost_engine, make_stage
    from gujax.uniqueness import gnq
    from gujax.grads import per_example_grads
    from gujax.models import MLP
    from gujax.train import make_train_step, per_example_stage, softmax_cross_entropy, TrainState

    def err(a, b):
        la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        assert len(la) == len(lb)
        diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(la, lb))
        scale = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
        return diff / max(scale, 1e-30)

    out = {"devices": len(jax.devices())}
    mesh = sharding.data_mesh()
    model = MLP(hidden=(8,), num_classes=3)
    n = 8
    key = jax.random.key(0)
    batch = {"image": jax.random.normal(key, (n, 4, 4, 1)), "label": jnp.arange(n) % 3,
             "id": jnp.arange(n), "mask": jnp.arange(n) != 5}
    examples = {"image": batch["image"], "label": batch["label"]}
    params = model.init(key, batch["image"][0])["params"]
    loss = softmax_cross_entropy(model)

    # GNQ of the global batch: ghost, sharded vs one device.
    single = jax.jit(lambda p, b: ghost_gnq(loss, p, b, reg=1e-2))(params, examples)
    step = sharding.sharded_jit(lambda p, b: ghost_gnq(loss, p, b, reg=1e-2), mesh,
                                batch_argnums=(1,))
    sharded_examples = sharding.shard_batch(examples, mesh)
    out["batch_split"] = sharded_examples["image"].sharding.spec == PartitionSpec("data")
    out["batch_shards"] = len(sharded_examples["image"].addressable_shards)
    out["ghost_gnq"] = err(step(params, sharded_examples), single)
    out["ghost_vs_explicit"] = err(single, gnq(per_example_grads(loss, params, examples), reg=1e-2))

    # An optax GNQ transformation on sharded per-example gradients.
    tx = transforms.gnq_censor(budget=1.0, num_examples=n, reg=1e-2)
    grads = per_example_grads(loss, params, examples)
    st = tx.init(params)
    upd = lambda g, s, ids, m: tx.update(g, s, params, example_ids=ids, mask=m)
    want = jax.jit(upd)(grads, st, batch["id"], batch["mask"])
    got = sharding.sharded_jit(upd, mesh, batch_argnums=(0, 2, 3))(
        grads, st, batch["id"], batch["mask"])
    out["transform"] = err(got, want)

    # Whole training steps (ghost GNQ stage and explicit DP-SGD), sharded vs not.
    policy = transforms.censor_policy(budget=1.0, num_examples=n, reg=1e-2)
    dp = dpsgd_aggregate(l2_norm_clip=0.1, noise_multiplier=1.0, expected_batch_size=7.0, seed=1)
    for name, stage, agg in (("train_ghost_gnq", make_stage(ghost_engine(loss), policy),
                              transforms.policy_transformation(policy)),
                             ("train_explicit_dpsgd", per_example_stage(loss, dp), dp)):
        opt = optax.sgd(0.1)
        train_step = make_train_step(stage, opt, seed=0)
        state = TrainState(jnp.zeros((), jnp.int32), params, agg.init(params), opt.init(params))
        want = train_step(state, batch)
        got = train_step(sharding.replicate(state, mesh), sharding.shard_batch(batch, mesh))
        keyless = lambda t: jax.tree_util.tree_map(
            lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a, t)
        out[name] = err(keyless(got), keyless(want))
    try:
        sharding.shard_batch({"x": jnp.ones((6, 2))}, mesh)
        out["indivisible_raises"] = False
    except ValueError:
        out["indivisible_raises"] = True
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runs_on_four_devices_with_the_batch_split(sharded_results):
    assert sharded_results["devices"] == 4
    assert sharded_results["batch_split"]
    assert sharded_results["batch_shards"] == 4


@pytest.mark.parametrize("check", ["ghost_gnq", "transform", "train_ghost_gnq",
                                   "train_explicit_dpsgd"])
def test_sharded_equals_single_device(sharded_results, check):
    assert sharded_results[check] < 1e-5, sharded_results


def test_single_device_ghost_matches_explicit(sharded_results):
    assert sharded_results["ghost_vs_explicit"] < 1e-3


def test_indivisible_batch_raises(sharded_results):
    assert sharded_results["indivisible_raises"]


def test_single_device_mesh_accepts_any_batch():
    import jax.numpy as jnp
    from gujax import sharding
    mesh = sharding.data_mesh()
    placed = sharding.shard_batch({"x": jnp.ones((3, 2))}, mesh)  # one device here
    assert placed["x"].shape == (3, 2)
