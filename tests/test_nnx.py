"""Flax NNX models on the ghost path: the same registry of rules as Linen,
against the explicit vmap(grad) Gram matrix in float64."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gujax.dpsgd import dpsgd_aggregate
from gujax.engine import explicit_engine, ghost_engine, make_stage
from gujax.ghost import describe, ghost_clipped_sum, ghost_dpsgd, ghost_gnq, ghost_gram
from gujax.ghost.rules import RULES
from gujax.grads import gram, per_example_grads
from gujax.policies import censor_policy
from gujax.uniqueness import gnq

B = 5


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(12, 7, rngs=rngs, param_dtype=jnp.float64)
        self.head = nnx.Linear(7, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x.reshape(-1))))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs, param_dtype=jnp.float64)
        self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs, param_dtype=jnp.float64)
        self.grouped = nnx.Conv(4, 4, (2, 2), strides=2, feature_group_count=2, rngs=rngs,
                                param_dtype=jnp.float64)
        self.head = nnx.Linear(4, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        h = jax.nn.relu(self.norm(self.conv(x)))
        return self.head(jnp.mean(self.grouped(h), axis=(0, 1)))


class Block(nnx.Module):
    def __init__(self, d, rngs):
        kw = dict(rngs=rngs, param_dtype=jnp.float64)
        self.ln = nnx.LayerNorm(d, **kw)
        self.q, self.k, self.v = (nnx.Linear(d, d, **kw) for _ in range(3))
        self.mlp = nnx.Linear(d, d, **kw)

    def __call__(self, x):
        h = self.ln(x)
        scores = self.q(h) @ self.k(h).T / np.sqrt(h.shape[-1])
        scores = jnp.where(jnp.tril(jnp.ones(scores.shape, bool)), scores, -1e30)
        x = x + jax.nn.softmax(scores, -1) @ self.v(h)
        return x + self.mlp(jax.nn.gelu(x))


class TinyLM(nnx.Module):
    def __init__(self, rngs, vocab=11, d=6, layers=2):
        kw = dict(rngs=rngs, param_dtype=jnp.float64)
        self.embed = nnx.Embed(vocab, d, **kw)
        self.pos = nnx.Embed(8, d, **kw)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, vocab, **kw)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[0]))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _classifier(model, x):
    graphdef, state = nnx.split(model)
    y = jnp.arange(B) % 3

    def loss(state, ex):
        logits = nnx.merge(graphdef, state)(ex["x"])
        return -jax.nn.log_softmax(logits)[ex["y"]]
    return loss, state, {"x": x, "y": y}


def _lm(model, tokens):
    graphdef, state = nnx.split(model)

    def loss(state, ex):
        logits = nnx.merge(graphdef, state)(ex["tokens"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:-1], ex["tokens"][1:]).mean()
    return loss, state, {"tokens": tokens}


def _case(name):
    rngs = nnx.Rngs(0)
    key = jax.random.key(1)
    if name == "mlp":
        return _classifier(MLP(rngs), jax.random.normal(key, (B, 3, 4), jnp.float64))
    if name == "cnn":
        return _classifier(CNN(rngs), jax.random.normal(key, (B, 6, 6, 2), jnp.float64))
    return _lm(TinyLM(rngs), jax.random.randint(key, (B, 7), 0, 11))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def _tree_rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    diff = max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(la, lb))
    return diff / max(np.max(np.abs(np.asarray(y))) for y in lb)


CASES = ["mlp", "cnn", "transformer"]


@pytest.mark.parametrize("name", CASES)
def test_ghost_gram_matches_explicit_float64(name):
    loss, state, batch = _case(name)
    k = jax.jit(ghost_gram, static_argnums=0)(loss, state, batch)
    want = jax.jit(lambda s, b: gram(per_example_grads(loss, s, b)))(state, batch)
    assert k.dtype == jnp.float64
    assert _rel(k, want) < 1e-10


@pytest.mark.parametrize("name", CASES)
def test_describe_shows_no_fallback(name):
    loss, state, batch = _case(name)
    kinds = describe(loss, state, batch)
    assert kinds.pop("fallback") == ""
    norms = {"norm"} if name == "cnn" else ({"blocks/0/ln", "blocks/1/ln"}
                                            if name == "transformer" else set())
    assert {p for p, kind in kinds.items() if kind == "local"} == norms
    if name == "transformer":
        assert {"embed", "pos", "head", "blocks/0/q", "blocks/1/mlp"} <= set(kinds)


def test_gnq_clipping_dpsgd_and_stage_match_explicit():
    loss, state, batch = _case("transformer")
    grads = per_example_grads(loss, state, batch)
    assert _rel(ghost_gnq(loss, state, batch, reg=1e-2), gnq(grads, reg=1e-2)) < 1e-9

    total, info = ghost_clipped_sum(loss, state, batch, l2_norm_clip=0.5)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, 1) for g in jax.tree_util.tree_leaves(grads)))
    factor = jnp.minimum(1.0, 0.5 / norms)
    want = jax.tree_util.tree_map(lambda g: jnp.tensordot(factor, g, 1), grads)
    assert _rel(info.norms, norms) < 1e-10
    assert _tree_rel(total, want) < 1e-10

    agg = dpsgd_aggregate(l2_norm_clip=0.5, noise_multiplier=1.0, expected_batch_size=B,
                          seed=3)
    update, _, _ = ghost_dpsgd(loss, state, batch, agg.init(state))
    want, _ = agg.update(grads, agg.init(state), state)
    assert _tree_rel(update, want) < 1e-10

    policy = censor_policy(budget=100.0, num_examples=B, reg=1e-2)
    full = dict(batch, id=jnp.arange(B), mask=jnp.arange(B) != 2)
    outs = [make_stage(engine(loss), policy, dtype=jnp.float64)(state, full, policy.init())
            for engine in (ghost_engine, explicit_engine)]
    assert _tree_rel(outs[0][0], outs[1][0]) < 1e-10
    assert _rel(outs[0][1].ledger.disclosure, outs[1][1].ledger.disclosure) < 1e-9


def test_one_registry_serves_both_apis():
    import flax.linen as nn
    assert RULES[nnx.Linear].factors is RULES[nn.Dense].factors
    assert RULES[nnx.Conv].factors is RULES[nn.Conv].factors
    assert RULES[nnx.Embed].factors is RULES[nn.Embed].factors


def test_layer_without_rule_is_local_or_fallback():
    class Custom(nnx.Module):
        """A layer with its own parameter and a child: no rule, so its own
        leaf goes to the explicit fallback, visible in describe."""
        def __init__(self, rngs):
            self.scale = nnx.Param(jnp.ones((3,), jnp.float64))
            self.inner = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)
            self.einsum = nnx.LinearGeneral(3, 3, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.einsum(self.inner(x) * self.scale[...])

    loss, state, batch = _classifier(Custom(nnx.Rngs(0)), jax.random.normal(
        jax.random.key(0), (B, 3), jnp.float64))
    kinds = describe(loss, state, batch)
    assert kinds["inner"] == "ghost" or kinds["inner"] == "materialise"
    assert kinds["einsum"] == "local"  # no rule: re-run alone
    assert "scale" in kinds["fallback"]
    want = gram(per_example_grads(loss, state, batch))
    assert _rel(ghost_gram(loss, state, batch), want) < 1e-10


def test_bridged_gujax_model_has_no_fallback():
    from gujax.models import SmallCNN
    from gujax.models import to_nnx
    x = jax.random.normal(jax.random.key(0), (B, 8, 8, 1), jnp.float64)
    model = to_nnx(SmallCNN(num_classes=3, widths=(4,), groups=2), x[0])
    loss, state, batch = _classifier(model, x)
    state = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state)
    kinds = describe(loss, state, batch)
    assert kinds.pop("fallback") == ""
    assert set(kinds.values()) <= {"ghost", "materialise", "local"}
    want = gram(per_example_grads(loss, state, batch))
    assert _rel(ghost_gram(loss, state, batch), want) < 1e-10
    with pytest.raises(ValueError, match="Linen"):
        to_nnx(MLP(nnx.Rngs(0)), x[0])


def test_per_example_grads_and_the_optax_transformations_take_an_nnx_state():
    """The documented NNX per-example path (README, "Flax NNX"): gradients
    with respect to an ``nnx.State`` are an ``nnx.State`` with a batch axis,
    and every optax transformation turns them into an update shaped like the
    state, which ``optax.apply_updates`` and ``nnx.merge`` take back."""
    from gujax.transforms import gnq_censor, gnq_monitor
    model = MLP(nnx.Rngs(0))
    loss, state, batch = _classifier(model, jax.random.normal(jax.random.key(1), (B, 3, 4),
                                                              jnp.float64))
    graphdef, _ = nnx.split(model)
    grads = per_example_grads(loss, state, batch)
    assert isinstance(grads, nnx.State)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(state)
    ids = jnp.arange(B)
    mean = jax.tree_util.tree_map(lambda g: g.mean(0), grads)
    for tx, expected in ((gnq_monitor(num_examples=B, reg=1e-2), mean),
                         (gnq_censor(budget=100.0, num_examples=B, reg=1e-2), mean)):
        chained = optax.chain(tx, optax.sgd(0.1))
        updates, opt_state = chained.update(grads, chained.init(state), state,
                                            example_ids=ids)
        assert isinstance(updates, nnx.State)
        assert _tree_rel(updates, jax.tree_util.tree_map(lambda m: -0.1 * m, expected)) < 1e-6
        ledger = opt_state[0]
        np.testing.assert_allclose(ledger.last_gnq, gnq(grads, reg=1e-2), rtol=1e-6)  # float32 ledger
        new_model = nnx.merge(graphdef, optax.apply_updates(state, updates))
        assert new_model(batch["x"][0]).shape == (3,)
    agg = dpsgd_aggregate(l2_norm_clip=0.5, noise_multiplier=0.0, expected_batch_size=B,
                          seed=0)
    update, _ = agg.update(grads, agg.init(state), state)
    assert isinstance(update, nnx.State)
