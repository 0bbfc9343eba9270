"""Stacked runs split over 4 (virtual CPU) devices, and model shares over 2
processes (``jax.distributed`` on localhost): the same models as one device.

Device counts are fixed before JAX initialises, so the checks run in fresh
interpreters (``XLA_FLAGS=--xla_force_host_platform_device_count=4``) and
report as JSON on the last line of stdout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

COMMON = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from gujax import sharding
    from gujax.engine import ghost_engine, make_stage
    from gujax.models import MLP
    from gujax.policies import censor_policy
    from gujax.train import TrainConfig, softmax_cross_entropy, train_stacked

    MODEL = MLP(hidden=(8,), num_classes=3)
    N = 24

    def run(models, **kw):
        # Run m: its own init, data and seed, all functions of m alone.
        params = [MODEL.init(jax.random.key(m), jnp.zeros((4,)))["params"] for m in models]
        rng = [np.random.default_rng(m) for m in models]
        data = [(r.normal(size=(N, 4)).astype(np.float32), r.integers(0, 3, N), np.arange(N))
                for r in rng]
        stage = make_stage(ghost_engine(softmax_cross_entropy(MODEL)),
                           censor_policy(budget=5.0, num_examples=N, reg=1e-2))
        epochs = kw.pop("epochs", 2)
        configs = [TrainConfig(epochs=epochs, batch_size=8, seed=m,
                               progress=False, checkpoint_every=3) for m in models]
        results = train_stacked(params=params, data=data, configs=configs, stage=stage, **kw)
        return [jax.tree_util.tree_leaves(jax.device_get((r.params, r.stage_state.ledger)))
                for r in results]

    def err(a, b):
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)
                   for x, y in zip(a, b))
""")

SHARDED = COMMON + textwrap.dedent("""
    import tempfile
    import gujax.train as train_module
    out = {"devices": len(jax.devices())}
    seen = []
    real = train_module.make_stacked_train_step
    def spying(*a, **k):
        step = real(*a, **k)
        def spy(states, *rest):
            seen.append(len(jax.tree_util.tree_leaves(states.params)[0].sharding.device_set))
            return step(states, *rest)
        return spy
    train_module.make_stacked_train_step = spying

    mesh = sharding.run_mesh()
    single = [run([m])[0] for m in range(4)]          # one model at a time
    sharded = run(range(4), mesh=mesh)
    out["state_devices"] = max(seen)
    out["sharded_vs_one_at_a_time"] = max(err(a, b) for a, b in zip(sharded, single))
    with tempfile.TemporaryDirectory() as workdir:
        run(range(4), mesh=mesh, workdir=workdir, epochs=1)
        resumed = run(range(4), mesh=mesh, workdir=workdir, epochs=2)
    out["resumed_vs_one_at_a_time"] = max(err(a, b) for a, b in zip(resumed, single))
    try:
        run(range(6), mesh=mesh)
        out["indivisible_raises"] = False
    except ValueError as e:
        out["indivisible_raises"] = "multiple of 4" in str(e)
    print(json.dumps(out))
""")

HOST = COMMON + textwrap.dedent("""
    port, index = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=index)
    mine = sharding.process_share(range(4))
    got = run(mine, mesh=sharding.run_mesh())
    print(json.dumps({"models": mine, "processes": jax.process_count(),
                      "params": [[np.asarray(a).tolist() for a in g] for g in got]}))
    jax.distributed.shutdown()
""")


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sharded():
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=_env(4), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _last_json(proc.stdout)


def test_stacked_runs_split_over_four_devices(sharded):
    assert sharded["devices"] == 4
    assert sharded["state_devices"] == 4


def test_sharded_models_equal_one_at_a_time(sharded):
    assert sharded["sharded_vs_one_at_a_time"] < 1e-5, sharded


def test_sharded_run_resumes_to_the_same_models(sharded):
    assert sharded["resumed_vs_one_at_a_time"] < 1e-5, sharded


def test_runs_that_do_not_split_raise(sharded):
    assert sharded["indivisible_raises"]


def test_process_share_partitions_the_models():
    from gujax.sharding import process_share
    shares = [process_share(range(7), process_index=i, process_count=3) for i in range(3)]
    assert sorted(sum(shares, [])) == list(range(7))
    assert process_share(range(3)) == [0, 1, 2]  # one process: all of them
    with pytest.raises(ValueError, match="process_index"):
        process_share(range(3), process_index=2, process_count=2)


@pytest.mark.slow
def test_two_processes_train_their_shares_as_one_would():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    hosts = [subprocess.Popen([sys.executable, "-c", HOST, str(port), str(i)], env=_env(1),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [h.communicate(timeout=600) for h in hosts]
    for h, (_, err) in zip(hosts, outs):
        assert h.returncode == 0, err[-4000:]
    shares = [_last_json(o) for o, _ in outs]
    assert [s["models"] for s in shares] == [[0, 2], [1, 3]]
    assert all(s["processes"] == 2 for s in shares)
    script = COMMON + "print(json.dumps([[np.asarray(a).tolist() for a in g] for g in run(range(4))]))"
    proc = subprocess.run([sys.executable, "-c", script], env=_env(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    every = _last_json(proc.stdout)
    import numpy as np
    for share in shares:
        for m, leaves in zip(share["models"], share["params"]):
            for got, want in zip(leaves, every[m]):
                got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
                assert np.max(np.abs(got - want)) <= 1e-5 * max(np.max(np.abs(want)), 1e-30)
