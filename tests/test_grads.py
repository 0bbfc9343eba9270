"""per_example_grads and gram against plain loops."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gujax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def setup(n=9, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"x": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 3, size=n))}
    model = MLP()
    params = model.init(jax.random.key(seed), batch["x"][:1])["params"]

    def loss(p, ex):
        logits = model.apply({"params": p}, ex["x"])
        return -jax.nn.log_softmax(logits)[ex["y"]]
    return loss, params, batch


def test_matches_python_loop_of_grad():
    loss, params, batch = setup()
    got = gujax.per_example_grads(loss, params, batch)
    for i in range(9):
        ex = jax.tree_util.tree_map(lambda a: a[i], batch)
        want = jax.grad(loss)(params, ex)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize("chunk", [1, 2, 4, 9, 100])
def test_chunked_equals_unchunked(chunk):
    loss, params, batch = setup()
    full = gujax.per_example_grads(loss, params, batch)
    chunked = jax.jit(lambda p, b: gujax.per_example_grads(loss, p, b, chunk_size=chunk))(
        params, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                           full, chunked)


def test_gram_equals_concatenated_product():
    loss, params, batch = setup()
    g = gujax.per_example_grads(loss, params, batch)
    flat = np.concatenate([np.asarray(x).reshape(9, -1) for x in jax.tree_util.tree_leaves(g)], 1)
    np.testing.assert_allclose(gujax.gram(g), flat @ flat.T, rtol=1e-5, atol=1e-6)


def test_nnx_module_via_split_state():
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)

    def loss(state, xi):
        return jnp.sum(nnx.merge(graphdef, state)(xi) ** 2)

    g = gujax.per_example_grads(loss, state, x)
    assert g["kernel"].value.shape == (5, 4, 2)
    # d/dW sum((x W + b)^2) = 2 x (x W + b)^T
    out = x @ state["kernel"].value + state["bias"].value
    want = 2 * x[:, :, None] * out[:, None, :]
    np.testing.assert_allclose(g["kernel"].value, want, rtol=1e-5)
    assert gujax.gnq(g, reg=0.1).shape == (5,)


@pytest.mark.parametrize("bad,match", [
    ({"x": jnp.ones((3, 2)), "y": jnp.ones((4,))}, "leading"),
    ({"x": jnp.ones((0, 4))}, "empty"),
    ({"x": jnp.float32(1.0)}, "scalar"),
])
def test_bad_batches(bad, match):
    loss, params, _ = setup()
    with pytest.raises(ValueError, match=match):
        gujax.per_example_grads(loss, params, bad)


def test_bad_chunk_size():
    loss, params, batch = setup()
    with pytest.raises(ValueError, match="chunk_size"):
        gujax.per_example_grads(loss, params, batch, chunk_size=0)
