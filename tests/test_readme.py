"""Every Python block of README.md runs as written.

The blocks assume what the README says they assume: a Flax model, its
``params``, a batch dict {"x", "y"} with its ``ids`` and the training arrays
``train_x``, ``train_y``. Here they are the embedded digits and a small MLP
(Linen; for the blocks that use ``nnx``, the same model through
``gujax.models.to_nnx``). The Linen blocks run in order in one namespace, the
NNX blocks in another, so a block may use what an earlier one defined.
"""
from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gujax
import gujax.data as gd
from gujax.models import MLP, to_nnx

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def _setup(nnx_model: bool) -> dict:
    data = gd.load("digits", "train")
    train_x = np.asarray(data.images, np.float32) / 255.0     # uint8 images
    train_y = np.asarray(data.labels, np.int32)
    linen = MLP(hidden=(32,), num_classes=10)
    params = linen.init(jax.random.key(0), train_x[:1])["params"]
    ids = np.arange(32)
    # The README's first block imports gujax and jax; later blocks rely on it.
    namespace = {"gujax": gujax, "jax": jax, "train_x": train_x, "train_y": train_y, "ids": ids,
                 "batch": {"x": jnp.asarray(train_x[ids]), "y": jnp.asarray(train_y[ids])}}
    if nnx_model:
        namespace["model"] = to_nnx(linen, train_x[0])
    else:
        namespace.update(model=linen, params=params)
    return namespace


def test_the_readme_has_the_blocks_this_test_knows():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert any("make_private" in b for b in blocks)
    assert sum("nnx" in b for b in blocks) >= 2


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_readme_python_blocks_run(kind, capsys):
    blocks = [b for b in python_blocks() if ("nnx" in b) == (kind == "nnx")]
    namespace = _setup(kind == "nnx")
    for block in blocks:
        exec(compile(block, f"README.md block\n{block[:60]}", "exec"), namespace)
    if kind == "linen":
        # The DP-SGD loop ran its whole accounted run and met its target.
        private = namespace["private"]
        assert private.epsilon <= 3.0 + 1e-6 and private.sampling == "poisson"
        assert "-DP, sigma" in capsys.readouterr().out
        before = MLP(hidden=(32,)).init(jax.random.key(0), namespace["train_x"][:1])["params"]
        moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                       namespace["params"], before)
        assert max(jax.tree_util.tree_leaves(moved)) > 0
        assert np.all(np.isfinite(np.asarray(namespace["nats"])))
    else:
        # The NNX per-example path: gradients and the update are nnx.States.
        from flax import nnx
        assert isinstance(namespace["grads"], nnx.State)
        assert isinstance(namespace["model"], nnx.Module)
        assert np.all(np.isfinite(np.asarray(namespace["scores"])))
