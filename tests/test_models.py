"""gujax.models: output shapes, the single-example convention, per-example gradients, layer types."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gujax.grads import per_example_grads
from gujax.models import MLP, SmallCNN, TransformerLM, WideResNet, param_count

ALLOWED_LAYERS = {nn.Dense, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm}

# Small configurations: (model, batch input, per-example output shape).
IMAGE_CASES = {
    "mlp_vector": (MLP(hidden=(8, 6), num_classes=3), (5, 12)),
    "mlp_image": (MLP(hidden=(8,), num_classes=3), (5, 8, 8, 1)),
    "cnn": (SmallCNN(num_classes=4, widths=(4, 8), groups=2), (3, 8, 8, 3)),
    "wrn": (WideResNet(depth=10, width=1, num_classes=4, groups=4), (2, 8, 8, 3)),
}
SMALL_LM = TransformerLM(vocab_size=11, d_model=8, num_heads=2, num_layers=2, max_len=6,
                         mlp_ratio=2)


def _image_batch(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _tokens(shape, vocab=11, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _cases():
    for name, (model, shape) in IMAGE_CASES.items():
        yield name, model, _image_batch(shape), (model.num_classes,)
    yield "transformer", SMALL_LM, _tokens((3, 6)), (6, 11)


CASES = list(_cases())
IDS = [c[0] for c in CASES]


# The WRN graph takes ~10-15 s to compile on a busy 2-core CPU per shape: its
# forward and gradient checks are slow tests (its layer-type check is not).
SLOW_WRN_CASES = [pytest.param(*c, marks=pytest.mark.slow) if c[0] == "wrn" else c for c in CASES]


@functools.lru_cache(maxsize=None)
def _variables(name):
    """Initialised once per model and shared by the tests (compilation dominates on CPU)."""
    _, model, x, _ = CASES[IDS.index(name)]
    return jax.jit(model.init)(jax.random.key(1), x)


@pytest.mark.parametrize("name,model,x,out_shape", SLOW_WRN_CASES, ids=IDS)
def test_forward_shapes_and_single_example_convention(name, model, x, out_shape):
    variables = _variables(name)
    apply = jax.jit(model.apply)  # one compilation per input shape, not one per op
    batched = apply(variables, x)
    assert batched.shape == (x.shape[0], *out_shape)
    assert batched.dtype == jnp.float32
    assert np.all(np.isfinite(batched))
    # One example without a batch axis gives that example's output, unbatched:
    # no layer mixes examples.
    for i in range(x.shape[0]):
        single = apply(variables, x[i])
        assert single.shape == out_shape
        np.testing.assert_allclose(single, batched[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,model,x,out_shape", SLOW_WRN_CASES, ids=IDS)
def test_per_example_grads_match_a_loop_of_grads(name, model, x, out_shape):
    params = _variables(name)["params"]
    num_out = out_shape[-1]
    targets = jax.random.randint(jax.random.key(3), (x.shape[0], *out_shape[:-1]), 0, num_out)

    def loss(p, example):  # one example, no batch axis
        logits = model.apply({"params": p}, example["x"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                             example["y"][..., None], axis=-1))

    batch = {"x": x, "y": targets}
    grads = jax.jit(lambda p, b: per_example_grads(loss, p, b))(params, batch)
    for leaf, param in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
        assert leaf.shape == (x.shape[0], *param.shape)
    reference_grad = jax.jit(jax.grad(loss))
    for i in range(x.shape[0]):
        example = jax.tree_util.tree_map(lambda a: a[i], batch)
        reference = reference_grad(params, example)
        for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)
    # The loss depends on every parameter, so no leaf's gradient is identically zero.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("name,model,x,out_shape", CASES, ids=IDS)
def test_every_parameter_belongs_to_a_standard_layer(name, model, x, out_shape):
    """Ghost-kernel rules intercept layers by type: no other layer may own parameters."""
    # Shapes are enough: trace init and apply without compiling anything.
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    owners = {}

    def record(next_fun, args, kwargs, context):
        owners[context.module.path] = type(context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)  # tracing is enough: nothing is compiled
    paths = [tuple(k.key for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
    assert paths
    for path in paths:
        assert owners.get(path[:-1]) in ALLOWED_LAYERS, (path, owners.get(path[:-1]))
    assert not any(issubclass(t, nn.BatchNorm) for t in owners.values())


def test_param_count_matches_closed_forms():
    d, h1, h2, c = 12, 8, 6, 3
    params = _variables("mlp_vector")["params"]
    assert param_count(params) == d * h1 + h1 + h1 * h2 + h2 + h2 * c + c

    v, dm, layers, t, r = 11, 8, 2, 6, 2
    params = _variables("transformer")["params"]
    block = 4 * (dm * dm + dm) + 2 * (2 * dm) + (dm * r * dm + r * dm) + (r * dm * dm + dm)
    expected = v * dm + t * dm + layers * block + 2 * dm + dm * v + v
    assert param_count(params) == expected


def test_default_configs_parameter_counts_are_consistent_with_layer_shapes():
    # WRN-16-4: 3x3 convs without bias; count them from the architecture.
    # eval_shape: parameter shapes without running the network.
    params = jax.eval_shape(WideResNet().init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))["params"]
    k = 4
    widths = [16 * k, 32 * k, 64 * k]
    convs = 3 * 3 * 3 * 16
    gn = 0
    cin = 16
    for w in widths:
        convs += 9 * cin * w + 9 * w * w + cin * w  # block 1 (with 1x1 projection)
        convs += 2 * 9 * w * w                       # block 2
        gn += 2 * (cin + w) + 2 * (w + w)
        cin = w
    gn += 2 * cin
    assert param_count(params) == convs + gn + cin * 10 + 10


def test_transformer_is_causal():
    tokens = _tokens((6,), seed=5)
    variables = _variables("transformer")
    apply = jax.jit(SMALL_LM.apply)
    base = apply(variables, tokens)
    for t in range(6):
        changed = tokens.at[t].set((tokens[t] + 1) % 11)
        out = apply(variables, changed)
        np.testing.assert_allclose(out[:t], base[:t], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out[t], base[t])


def test_bad_inputs_raise_value_error():
    cnn, shape = IMAGE_CASES["cnn"]
    variables = _variables("cnn")
    with pytest.raises(ValueError, match="rank"):
        cnn.apply(variables, jnp.zeros((2, 1, 8, 8, 3)))
    with pytest.raises(ValueError, match="floating"):
        cnn.apply(variables, jnp.zeros(shape, jnp.uint8))
    lm_vars = _variables("transformer")
    with pytest.raises(ValueError, match="integer"):
        SMALL_LM.apply(lm_vars, jnp.zeros((6,), jnp.float32))
    with pytest.raises(ValueError, match="max_len"):
        SMALL_LM.apply(lm_vars, jnp.zeros((7,), jnp.int32))
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(TransformerLM(d_model=10, num_heads=4).init, jax.random.key(0),
                       jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="6n"):
        jax.eval_shape(WideResNet(depth=12).init, jax.random.key(0), jnp.zeros((8, 8, 3)))
