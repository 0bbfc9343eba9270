"""Ghost kernels against the explicit vmap(grad) path, layer by layer and on whole models."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gujax.dpsgd import dpsgd_aggregate
from gujax.noise import Noise
from gujax.policies import DpsgdState, dpsgd_policy
from gujax.ghost.capture import capture
from gujax.ghost.clipping import ghost_clipped_sum, ghost_dpsgd
from gujax.ghost.kernels import (describe, factors_gram, factors_sq_norms, ghost_gram,
                              ghost_gram_and_grad, ghost_is_cheaper, ghost_gnq,
                              tape_weighted_grad)
from gujax.ghost.rules import Factors
from gujax.uniqueness import gnq, gnq_from_gram
from gujax.grads import gram, per_example_grads

B = 5


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _tree_rel_err(a, b):
    """Largest entry error over the whole pytree, relative to its largest
    entry (a leaf whose gradient is ~0 by symmetry has no relative scale)."""
    diff = max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    scale = max(np.max(np.abs(np.asarray(y, np.float64))) for y in jax.tree_util.tree_leaves(b))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return diff / scale


def _make(module, x, *, x64=False, seed=0):
    """params, batch and loss for ``module`` applied to per-example inputs ``x``
    (leading axis B); the loss is a nonlinear function of the output with a
    random per-example weighting, so every example's output gradient differs."""
    params = module.init(jax.random.key(seed), x[0])["params"]
    out = jax.eval_shape(lambda p, xi: module.apply({"params": p}, xi), params, x[0])
    w = jax.random.normal(jax.random.key(seed + 1), (x.shape[0],) + out.shape)
    if x64:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        w = w.astype(jnp.float64)
        if jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float64)

    def loss(p, ex):
        y = module.apply({"params": p}, ex["x"])
        return jnp.sum(jnp.tanh(y) * ex["w"]) + 0.1 * jnp.sum(y ** 2)

    return params, {"x": x, "w": w}, loss


def _explicit(loss, params, batch):
    """The reference: materialised per-example gradients, jitted (eager
    vmap(grad) compiles every primitive on its own and is far slower)."""
    return jax.jit(per_example_grads, static_argnums=0)(loss, params, batch)


def _explicit_gram(loss, params, batch):
    return jax.jit(gram)(_explicit(loss, params, batch))


def _ghost_gram(loss, params, batch):
    return jax.jit(ghost_gram, static_argnums=0)(loss, params, batch)


class _Wrap(nn.Module):
    """A model around one layer (the layer is a child, as in real models)."""
    layer: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.layer(x)


class _Twice(nn.Module):
    """One Dense applied twice: its gradient is the sum over both calls."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3)
        return dense(jnp.tanh(dense(x)))


class _Tied(nn.Module):
    """Embed used as lookup and as output layer (``attend``): local rule."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 4)
        return embed.attend(jnp.tanh(embed(tokens)))


class _OwnAndChild(nn.Module):
    """Owns a parameter directly and has a child layer: the fallback path."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.normal(1.0), (x.shape[-1],))
        return nn.Dense(3)(x * scale)


def _tokens(shape, vocab, seed=3):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _normal(shape, seed=3):
    return jax.random.normal(jax.random.key(seed), shape)


LAYER_CASES = {
    "dense": (lambda: _Wrap(nn.Dense(3)), lambda: _normal((B, 4))),
    "dense_no_bias": (lambda: _Wrap(nn.Dense(3, use_bias=False)), lambda: _normal((B, 4))),
    "dense_positions": (lambda: _Wrap(nn.Dense(3)), lambda: _normal((B, 6, 4))),
    "dense_positions_no_bias": (lambda: _Wrap(nn.Dense(3, use_bias=False)),
                                lambda: _normal((B, 6, 4))),
    "dense_two_position_axes": (lambda: _Wrap(nn.Dense(2)), lambda: _normal((B, 3, 2, 4))),
    "dense_called_twice": (lambda: _Twice(), lambda: _normal((B, 2, 3))),
    "conv_same": (lambda: _Wrap(nn.Conv(3, (3, 3))), lambda: _normal((B, 6, 6, 2))),
    "conv_valid_stride2": (lambda: _Wrap(nn.Conv(3, (3, 3), strides=2, padding="VALID")),
                           lambda: _normal((B, 7, 7, 2))),
    "conv_explicit_pad_no_bias": (
        lambda: _Wrap(nn.Conv(3, (2, 3), padding=((1, 0), (2, 1)), use_bias=False)),
        lambda: _normal((B, 5, 5, 2))),
    "conv_groups": (lambda: _Wrap(nn.Conv(4, (3, 3), feature_group_count=2)),
                    lambda: _normal((B, 5, 5, 4))),
    "conv_dilations": (lambda: _Wrap(nn.Conv(3, (2, 2), kernel_dilation=2, input_dilation=2,
                                                         padding=((1, 1), (1, 0)))),
                       lambda: _normal((B, 4, 4, 2))),
    "conv_circular": (lambda: _Wrap(nn.Conv(3, (3, 3), padding="CIRCULAR")),
                      lambda: _normal((B, 5, 5, 2))),
    "conv1d_causal": (lambda: _Wrap(nn.Conv(3, (3,), padding="CAUSAL")),
                      lambda: _normal((B, 7, 2))),
    "conv_batched_example": (lambda: _Wrap(nn.Conv(3, (3, 3), strides=2)),
                             lambda: _normal((B, 2, 5, 5, 2))),
    "embed": (lambda: _Wrap(nn.Embed(7, 3)), lambda: _tokens((B, 6), 7)),
    "embed_tied_attend": (lambda: _Tied(), lambda: _tokens((B, 5), 11)),
    "layernorm": (lambda: _Wrap(nn.LayerNorm()), lambda: _normal((B, 3, 4))),
    "groupnorm": (lambda: _Wrap(nn.GroupNorm(num_groups=2)), lambda: _normal((B, 3, 3, 4))),
    "own_param_and_child": (lambda: _OwnAndChild(), lambda: _normal((B, 4))),
}

EXPECTED_KIND = {
    "dense": "ghost", "dense_no_bias": "ghost", "embed_tied_attend": "local",
    "layernorm": "local", "groupnorm": "local", "conv_groups": "materialise",
}


# A quick subset runs by default; every case runs with the slow marker (CI).
QUICK_LAYER_CASES = ("dense", "dense_positions", "dense_called_twice", "conv_groups", "embed",
                     "embed_tied_attend", "layernorm", "own_param_and_child")


def _cases(names, quick):
    return [pytest.param(n, marks=() if n in quick else pytest.mark.slow) for n in sorted(names)]


@pytest.mark.parametrize("name", _cases(LAYER_CASES, QUICK_LAYER_CASES))
def test_layer_gram_matches_explicit_float32(name):
    make_module, make_x = LAYER_CASES[name]
    params, batch, loss = _make(make_module(), make_x())
    k = _ghost_gram(loss, params, batch)
    assert k.shape == (B, B)
    assert _rel_err(k, _explicit_gram(loss, params, batch)) < 1e-5
    kinds = describe(loss, params, batch)
    if name in EXPECTED_KIND:
        assert EXPECTED_KIND[name] in kinds.values(), kinds
    if name == "own_param_and_child":
        assert kinds["fallback"] == "['_OwnAndChild']['scale']" or "scale" in kinds["fallback"]


@pytest.mark.parametrize("name", _cases(
    ["dense_positions", "conv_groups", "conv_valid_stride2", "embed", "layernorm",
     "own_param_and_child"], ("embed", "layernorm")))
def test_layer_gram_matches_explicit_float64(name):
    make_module, make_x = LAYER_CASES[name]
    with jax.enable_x64(True):
        params, batch, loss = _make(make_module(), make_x(), x64=True)
        k = _ghost_gram(loss, params, batch)
        assert k.dtype == jnp.float64
        assert _rel_err(k, _explicit_gram(loss, params, batch)) < 1e-10


def _naive_factor_gram(f: Factors):
    x, d = np.asarray(f.x, np.float64), np.asarray(f.d, np.float64)
    grads = [np.concatenate([np.einsum("ti,to->io", x[j, :, g], d[j, :, g]).ravel()
                             for g in range(x.shape[2])]
                            + ([d[j].sum(0).ravel()] if f.has_bias else []))
             for j in range(x.shape[0])]
    grads = np.stack(grads)
    return grads @ grads.T


@pytest.mark.parametrize("shape,ghost", [((4, 2, 2, 16, 16), True), ((4, 6, 1, 2, 3), False)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_factor_kernels_both_branches(shape, ghost, has_bias):
    """Both the ghost and the materialising branch equal the definition, and
    the cost rule picks the branch the shapes call for."""
    b, t, g, d_in, d_out = shape
    f = Factors(_normal((b, t, g, d_in), 1), _normal((b, t, g, d_out), 2), has_bias)
    assert ghost_is_cheaper(f) == ghost
    ref = _naive_factor_gram(f)
    assert _rel_err(factors_gram(f), ref) < 1e-5
    assert _rel_err(factors_sq_norms(f), np.diag(ref)) < 1e-5


@pytest.mark.parametrize("shape", [(128, 1, 2, 3, 2), (64, 3, 1, 2, 2)])
def test_factor_kernels_blocked_symmetric_products(shape):
    """Large batches take the blocked symmetric product (4 and 2 row blocks)."""
    b, t, g, d_in, d_out = shape
    f = Factors(_normal((b, t, g, d_in), 1), _normal((b, t, g, d_out), 2), True)
    assert _rel_err(factors_gram(f), _naive_factor_gram(f)) < 1e-5


def test_ghost_is_cheaper_matches_cost_formula():
    # T = 1: ghost B^2 (d_in + d_out) always beats B d_in d_out + B^2 d_in d_out.
    assert ghost_is_cheaper(Factors(jnp.zeros((256, 1, 1, 784)), jnp.zeros((256, 1, 1, 512)), True))
    # Long sequences of narrow features: materialise.
    assert not ghost_is_cheaper(Factors(jnp.zeros((64, 64, 1, 128)), jnp.zeros((64, 64, 1, 128)), True))


# ---------------------------------------------------------------------------
# Whole models.

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.reshape(x, (*x.shape[:-3], -1)) if x.ndim >= 3 else x
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=2)(nn.Conv(8, (3, 3))(x)))
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.relu(nn.GroupNorm(num_groups=4)(x))
        x = jnp.mean(x, axis=(-3, -2))
        return nn.Dense(10)(x)


class Block(nn.Module):
    d_model: int
    num_heads: int

    @nn.compact
    def __call__(self, h):
        t = h.shape[-2]
        head = self.d_model // self.num_heads
        y = nn.LayerNorm()(h)
        q, k, v = (jnp.reshape(nn.Dense(self.d_model)(y), y.shape[:-1] + (self.num_heads, head))
                   for _ in range(3))
        att = jnp.einsum("...thd,...shd->...hts", q, k) / np.sqrt(head)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        y = jnp.einsum("...hts,...shd->...thd", jax.nn.softmax(att, -1), v)
        h = h + nn.Dense(self.d_model)(jnp.reshape(y, h.shape))
        y = nn.Dense(self.d_model)(nn.gelu(nn.Dense(2 * self.d_model)(nn.LayerNorm()(h))))
        return h + y


class TinyLM(nn.Module):
    vocab: int = 13
    d_model: int = 8
    max_len: int = 6

    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        h = nn.Embed(self.vocab, self.d_model)(tokens) + pos[: tokens.shape[-1]]
        for _ in range(2):
            h = Block(self.d_model, 2)(h)
        return nn.Dense(self.vocab)(nn.LayerNorm()(h))


def _classifier(model, x, num_classes=10, seed=0):
    params = model.init(jax.random.key(seed), x[0])["params"]
    y = jnp.arange(x.shape[0]) % num_classes

    def loss(p, ex):
        return -jax.nn.log_softmax(model.apply({"params": p}, ex["x"]))[ex["y"]]

    return params, {"x": x, "y": y}, loss


def _lm(seed=0):
    model = TinyLM()
    tokens = _tokens((B, 6), 13)
    params = model.init(jax.random.key(seed), tokens[0])["params"]

    def loss(p, ex):
        logits = model.apply({"params": p}, ex["tokens"][:-1])
        return -jnp.mean(jnp.take_along_axis(
            jax.nn.log_softmax(logits), ex["tokens"][1:, None], -1))

    return params, {"tokens": tokens}, loss


MODELS = {
    "mlp": lambda: _classifier(MLP(), _normal((B, 12))),
    "cnn": lambda: _classifier(CNN(), _normal((B, 8, 8, 3))),
    "transformer": _lm,
}


@pytest.mark.parametrize("name", _cases(MODELS, ("mlp",)))
def test_model_gram_grad_and_gnq_match_explicit(name):
    params, batch, loss = MODELS[name]()
    k, grad, losses = jax.jit(lambda p, b: ghost_gram_and_grad(loss, p, b))(params, batch)
    explicit = _explicit(loss, params, batch)
    assert _rel_err(k, gram(explicit)) < 1e-5
    summed = jax.tree_util.tree_map(lambda g: g.sum(0), explicit)
    assert _tree_rel_err(grad, summed) < 1e-5
    np.testing.assert_allclose(losses, jax.vmap(loss, (None, 0))(params, batch), rtol=1e-6)
    scores = gnq_from_gram(k, reg=1e-2)
    assert _rel_err(scores, gnq(explicit, reg=1e-2)) < 1e-3
    kinds = describe(loss, params, batch)
    if name == "transformer":
        assert "pos" in kinds["fallback"]  # owned by the model next to its children


@pytest.mark.slow
def test_model_gram_float64():
    with jax.enable_x64(True):
        params, batch, loss = MODELS["transformer"]()
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        k = _ghost_gram(loss, params, batch)
        assert _rel_err(k, _explicit_gram(loss, params, batch)) < 1e-10
        params, batch, loss = MODELS["cnn"]()
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        batch = {"x": batch["x"].astype(jnp.float64), "y": batch["y"]}
        assert _rel_err(_ghost_gram(loss, params, batch), _explicit_gram(loss, params, batch)) < 1e-10


@pytest.mark.parametrize("name", _cases(["mlp", "cnn"], ("mlp",)))
def test_weighted_grad_matches_explicit_and_drops_zero_weights(name):
    params, batch, loss = MODELS[name]()
    weights = jnp.array([0.5, 0.0, 2.0, -1.0, 0.25])
    got = jax.jit(lambda p, b, w: tape_weighted_grad(capture(loss, p, b), p, w))(
        params, batch, weights)
    explicit = _explicit(loss, params, batch)
    want = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, axes=1), explicit)
    assert _tree_rel_err(got, want) < 1e-5
    # A NaN example with weight 0 leaves the sum untouched.
    bad = {"x": batch["x"].at[1].set(jnp.nan), "y": batch["y"]}
    got_bad = jax.jit(lambda p, b, w: tape_weighted_grad(capture(loss, p, b), p, w))(
        params, bad, weights)
    assert _tree_rel_err(got_bad, want) < 1e-5


# ---------------------------------------------------------------------------
# Ghost clipping.

@pytest.mark.parametrize("noise", [Noise(), Noise("rbg", "flat")], ids=["threefry", "rbg-flat"])
@pytest.mark.parametrize("name", _cases(["mlp", "transformer"], ("mlp",)))
def test_ghost_dpsgd_matches_materialised(name, noise):
    params, batch, loss = MODELS[name]()
    explicit = _explicit(loss, params, batch)
    norms = np.sqrt(np.asarray(gram(explicit)).diagonal())
    clip = float(np.median(norms))  # some rows clipped, some not
    mask = jnp.array([True, True, False, True, True])
    reference = dpsgd_aggregate(l2_norm_clip=clip, noise_multiplier=0.7,
                                expected_batch_size=4.0, seed=3, noise=noise)
    state = reference.init(params)
    want, want_state = jax.jit(reference.update)(explicit, state, params, mask=mask)
    step = jax.jit(lambda p, b, s, m: ghost_dpsgd(loss, p, b, s, mask=m, noise=noise))
    got, got_state, info = step(params, batch, state, mask)
    assert _tree_rel_err(got, want) < 1e-5
    np.testing.assert_array_equal(jax.random.key_data(got_state.key),
                                  jax.random.key_data(want_state.key))
    np.testing.assert_allclose(info.norms, norms, rtol=1e-5)
    assert info.weights[2] == 0 and 0 < np.sum(np.asarray(info.weights) < 1) < B


@pytest.mark.slow
def test_ghost_dpsgd_matches_optax_contrib_without_mask():
    params, batch, loss = MODELS["mlp"]()
    explicit = _explicit(loss, params, batch)
    clip = float(np.median(np.sqrt(np.asarray(gram(explicit)).diagonal())))
    tx = optax.contrib.differentially_private_aggregate(clip, 1.1, key=jax.random.key(7))
    want, _ = jax.jit(tx.update)(explicit, tx.init(params), params)
    # optax divides by the batch B; the same key schedule draws the same noise.
    state = DpsgdState(jax.random.key(7), *map(jnp.float32, (1.1, clip, B)))
    got, _, _ = jax.jit(lambda p, b, s: ghost_dpsgd(loss, p, b, s))(params, batch, state)
    assert _tree_rel_err(got, want) < 1e-5


def test_ghost_clipped_sum_bounds_every_norm():
    params, batch, loss = MODELS["mlp"]()
    total, info = jax.jit(lambda p, b: ghost_clipped_sum(loss, p, b, l2_norm_clip=1e-3))(
        params, batch)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(total)))
    assert norm <= B * 1e-3 * (1 + 1e-5)
    np.testing.assert_allclose(info.norms * info.weights, 1e-3, rtol=1e-5)
    # The clipped sum alone draws no noise (a sigma = 0 finish would still
    # draw P Gaussians: sigma is traced state); ghost_dpsgd does.
    program = str(jax.make_jaxpr(lambda p, b: ghost_clipped_sum(loss, p, b, l2_norm_clip=1.0))(
        params, batch))
    assert "threefry" not in program and "random_bits" not in program
    state = dpsgd_policy(l2_norm_clip=1.0, expected_batch_size=B,
                         noise_multiplier=1.0).init()
    assert "random_bits" in str(jax.make_jaxpr(lambda p, b: ghost_dpsgd(loss, p, b, state))(
        params, batch))


# ---------------------------------------------------------------------------
# Bad input.

def test_bad_input_raises_before_compute():
    params, batch, loss = MODELS["mlp"]()
    with pytest.raises(ValueError, match="empty"):
        ghost_gram(loss, params, {"x": batch["x"][:0], "y": batch["y"][:0]})
    with pytest.raises(ValueError, match="leading"):
        ghost_gram(loss, params, {"x": batch["x"], "y": batch["y"][:3]})
    with pytest.raises(ValueError, match="scalar"):
        ghost_gram(lambda p, ex: jnp.stack([loss(p, ex)] * 2), params, batch)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        ghost_clipped_sum(loss, params, batch, l2_norm_clip=0.0)
    with pytest.raises(ValueError, match="mask"):
        ghost_clipped_sum(loss, params, batch, l2_norm_clip=1.0, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="DpsgdState"):
        ghost_dpsgd(loss, params, batch, optax.contrib.DifferentiallyPrivateAggregateState(
            jax.random.key(0)))
    with pytest.raises(ValueError, match="reg"):
        ghost_gnq(loss, params, batch, reg=0.0)


def test_nonfinite_example_is_dropped_from_gnq_like_explicit():
    params, batch, loss = MODELS["mlp"]()
    bad = {"x": batch["x"].at[2].set(jnp.nan), "y": batch["y"]}
    got = jax.jit(lambda p, b: ghost_gnq(loss, p, b, reg=1e-2))(params, bad)
    want = gnq(_explicit(loss, params, bad), reg=1e-2)
    assert np.isnan(got[2]) and np.isnan(want[2])
    keep = np.array([0, 1, 3, 4])
    assert _rel_err(np.asarray(got)[keep], np.asarray(want)[keep]) < 1e-3


# ---------------------------------------------------------------------------
# Trainer gradient stages: ghost equals explicit.

def _stage_pair(kind, n_train, budget):
    from gujax import policies, transforms
    from gujax.engine import ghost_engine, make_stage
    if kind == "dpsgd":
        settings = dict(l2_norm_clip=0.05, noise_multiplier=0.8, expected_batch_size=5.0)
        aggregator = dpsgd_aggregate(**settings, seed=2)
        return aggregator, lambda loss: make_stage(ghost_engine(loss), policies.dpsgd_policy(
            **settings, seed=2))
    policy = {
        "monitor": lambda: transforms.monitor_policy(num_examples=n_train, reg=1e-2),
        "censor": lambda: transforms.censor_policy(budget=budget, num_examples=n_train,
                                                 reg=1e-2),
        "clip": lambda: transforms.clip_policy(max_step=0.05,
                                               num_examples=n_train, reg=1e-2),
    }[kind]()
    return (transforms.policy_transformation(policy),
            lambda loss: make_stage(ghost_engine(loss), policy))


@pytest.mark.parametrize("kind", _cases(["monitor", "censor", "clip", "dpsgd"],
                                        ("censor", "dpsgd")))
def test_ghost_stage_equals_explicit_stage(kind):
    from gujax.models import MLP
    from gujax.train import per_example_stage, softmax_cross_entropy
    model = MLP(hidden=(8,), num_classes=3)
    n = 6
    batch = {"image": _normal((n, 4, 4, 1)), "label": jnp.arange(n) % 3,
             "id": jnp.array([3, 0, 7, 2, 5, 1]),
             "mask": jnp.array([True, True, True, False, True, True])}
    params = model.init(jax.random.key(0), batch["image"][0])["params"]
    loss = softmax_cross_entropy(model)
    # A budget at the median raw disclosure: about half the rows refused.
    real = np.asarray(batch["mask"])
    raw = gnq(jax.tree_util.tree_map(lambda g: g[real], _explicit(
        loss, params, {"image": batch["image"], "label": batch["label"]})), reg=1e-2)
    budget = float(np.median(0.5 * np.log1p(np.asarray(raw))))
    aggregator, make_stage = _stage_pair(kind, n_train=8, budget=budget)
    state = aggregator.init(params)
    want = jax.jit(per_example_stage(loss, aggregator))(params, batch, state)
    got = jax.jit(make_stage(loss))(params, batch, state)
    assert _tree_rel_err(got[0], want[0]) < 1e-5          # the update
    for a, b in zip(jax.tree_util.tree_leaves(got[1:]), jax.tree_util.tree_leaves(want[1:])):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=2e-4, atol=1e-6)
    if kind in ("censor", "clip"):  # the policy really acted (the update is
        # still non-zero: _tree_rel_err is NaN for an all-zero reference)
        assert float(got[2]["num_refused"] + got[2]["num_clipped"]) > 0


def _monitor_stage_case(model_name, x64, nan_row):
    from gujax.models import MLP, SmallCNN
    from gujax.train import softmax_cross_entropy
    n = 7
    shape, model = {
        "mlp": ((n, 4, 4, 1), MLP(hidden=(8, 8), num_classes=3)),
        "cnn": ((n, 6, 6, 3), SmallCNN(num_classes=3, widths=(4, 8), groups=2)),
    }[model_name]
    # Row 3 is padding; row 5 a real row whose gradient is NaN (if nan_row).
    image = _normal(shape)
    if nan_row:
        image = image.at[5].set(jnp.nan)
    batch = {"image": image, "label": jnp.arange(n) % 3,
             "id": jnp.array([3, 0, 7, 2, 5, 1, 6]),
             "mask": jnp.array([True, True, True, False, True, True, True])}
    params = model.init(jax.random.key(0), image[0])["params"]
    if x64:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        batch["image"] = batch["image"].astype(jnp.float64)
    loss = softmax_cross_entropy(model)
    grads = _explicit(loss, params, {"image": batch["image"], "label": batch["label"]})
    norms = np.sqrt(np.asarray(gram(grads)).diagonal())
    clip = float(np.median(norms[[0, 1, 2, 4, 6]]))  # real finite rows: some clipped
    return params, batch, loss, clip


@pytest.mark.parametrize("case", _cases(["mlp-f32", "cnn-f32", "mlp-f64", "cnn-f64"],
                                        ("mlp-f32", "cnn-f32", "mlp-f64")))
def test_dpsgd_monitor_stage_equals_explicit_stage(case):
    from gujax.dpsgd import dpsgd_monitor
    from gujax.engine import ghost_engine, make_stage
    from gujax.policies import dpsgd_policy
    from gujax.train import per_example_stage
    model_name, x64 = case[:3], case.endswith("f64")
    # The float64 CPU reference cannot hold a NaN row on a conv net: XLA's
    # float64 batch-grouped conv (vmap(grad) of a conv's kernel) spreads one
    # example's NaN to every example, so the explicit path drops the whole
    # batch (the ghost path does not). That case runs without the NaN row.
    nan_row = not (x64 and model_name == "cnn")
    with jax.enable_x64(x64):
        params, batch, loss, clip = _monitor_stage_case(model_name, x64, nan_row)
        dtype = jnp.float64 if x64 else None
        settings = dict(l2_norm_clip=clip, expected_batch_size=5.0, dtype=dtype)
        aggregator = dpsgd_monitor(noise_multiplier=0.8, seed=2, num_examples=8, **settings)
        explicit = jax.jit(per_example_stage(loss, aggregator))
        ghost = jax.jit(make_stage(ghost_engine(loss), dpsgd_policy(
            noise_multiplier=0.8, seed=2, num_examples=8, l2_norm_clip=clip,
            expected_batch_size=5.0), dtype=dtype))
        state = aggregator.init(params)
        want, got = explicit(params, batch, state), ghost(params, batch, state)
        tol = 1e-10 if x64 else 1e-5
        assert _tree_rel_err(got[0], want[0]) < tol
        # And without noise (the noise is most of the update: it could hide a
        # clipping error). sigma lives in the state, so nothing recompiles.
        state0 = state._replace(noise_multiplier=jnp.asarray(1e-30, jnp.float32))
        assert _tree_rel_err(ghost(params, batch, state0)[0],
                             explicit(params, batch, state0)[0]) < tol
        got_state, want_state = got[1], want[1]
        np.testing.assert_array_equal(jax.random.key_data(got_state.key),
                                      jax.random.key_data(want_state.key))
        for name, a, b in zip(want_state.gnq._fields, got_state.gnq, want_state.gnq):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
            if b.any():
                assert _rel_err(np.nan_to_num(a), np.nan_to_num(b)) < tol, name
            else:
                assert not a.any(), name
        assert got[2].keys() == want[2].keys()
        for name in want[2]:
            np.testing.assert_allclose(np.asarray(got[2][name], np.float64),
                                       np.asarray(want[2][name], np.float64),
                                       rtol=tol, err_msg=name)
        # The case exercised what it should: charges and the NaN row (the
        # median clip norm clips 2 of the 5 real finite rows).
        ledger = got_state.gnq
        assert int(ledger.num_scored) == 6 and int(ledger.num_nonfinite) == int(nan_row)
        assert float(ledger.max_step_disclosure) > 0
        assert np.isnan(np.asarray(ledger.last_gnq)[1]) == nan_row  # id of row 5
