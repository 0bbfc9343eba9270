"""Gradient engines, and the one training stage built from an engine and a policy.

An *engine* turns (params, a batch of examples) into a ``GradientPass``: the
per-example losses, the batch statistics a policy reads (``BatchStats``: the
squared norms, and the Gram matrix K_jk = <g_j, g_k> when asked for) and the
weighted sum sum_j w_j g_j. Two engines give the same pass to rounding:

    explicit_engine(loss_fn)   vmap(grad): per-example gradients materialised
    ghost_engine(loss_fn)      gujax.ghost: one batch backward pass and
                               per-layer kernels, no per-example gradients

A *policy* (``gujax.policies``) decides per-example weights from K. The
*stage* is the two together, the unit the trainer steps with:

    stage = make_stage(ghost_engine(loss_fn), censor_policy(...))
    state = stage.init(params)
    update, state, metrics = stage(params, batch, state)

``batch`` is a dict of arrays with a leading axis B: the model's inputs under
any keys (``{"image", "label"}`` for the classifiers, ``{"tokens"}`` for a
language model), plus ``"id"`` (B,) int, the examples' training-set indices,
and ``"mask"`` (B,) bool, False for padding rows; everything but "id" and
"mask" is passed to ``loss_fn(params, example)`` one example at a time.

``per_example_stage`` adapts any optax transformation over per-example
gradients (``gujax.gnq_censor``, ``gujax.dpsgd_aggregate``, ...) into a stage.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gujax.ghost.capture import capture
from gujax.ghost.kernels import tape_gram_keeping_grads, tape_sq_norms, tape_weighted_grad
from gujax.grads import batch_size, gram as gram_matrix, per_example_losses_and_grads
from gujax.policies import BatchStats, Policy

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
RESERVED_KEYS = ("id", "mask")


class GradientPass(NamedTuple):
    """What an engine computed for one batch (trace-time functions, no state).

    losses: (B,) per-example losses.
    statistics(cross_terms, dtype=None) -> ``BatchStats``: the (B,) squared
      norms, and with ``cross_terms`` the (B + R, B + R) Gram matrix in
      ``dtype`` (its diagonal then gives the norms; without, the cheaper norm
      kernels run and no cross term is formed).
    weighted_sum(weights (B,), stats) -> sum_j w_j g_j shaped like params
      (rows with weight 0 are skipped exactly, even if their gradient is NaN;
      ``stats`` carries what the statistics already materialised).
    """
    losses: jax.Array
    statistics: Callable[..., BatchStats]
    weighted_sum: Callable[[jax.Array, BatchStats], PyTree]


class Engine(NamedTuple):
    """name: "explicit" or "ghost"; run(params, examples) -> ``GradientPass``."""
    name: str
    run: Callable[[PyTree, PyTree], GradientPass]


def weighted_sum(per_example: PyTree, weights: jax.Array) -> PyTree:
    """sum_j weights_j g_j over the leading axis; rows with weight 0 are
    skipped exactly (0 * NaN would otherwise poison the sum)."""
    def leaf_sum(g):
        keep = (weights != 0).reshape((-1,) + (1,) * (g.ndim - 1))
        g = jnp.where(keep, g, 0)
        return jnp.tensordot(weights.astype(g.dtype), g, axes=1)
    return jax.tree_util.tree_map(leaf_sum, per_example)


def _sq_norms(per_example: PyTree) -> jax.Array:
    b = batch_size(per_example, name="per-example gradients")
    return sum(jnp.sum(jnp.square(jnp.reshape(g, (b, -1))), axis=1)
               for g in jax.tree_util.tree_leaves(per_example))


def gradients_pass(per_example: PyTree, losses: jax.Array | None = None, *,
                   reference: PyTree | None = None) -> GradientPass:
    """A pass over given per-example gradients (leaves (B, *param.shape)).

    ``reference``: R more rows (same structure) that enter the Gram matrix
    after the B batch rows but are never summed.
    """
    rows = per_example if reference is None else _with_reference(per_example, reference)
    b = batch_size(per_example, name="per-example gradients")

    def statistics(cross_terms, dtype=None):
        if not cross_terms:
            return BatchStats(_sq_norms(per_example))
        k = gram_matrix(rows, dtype=dtype)
        return BatchStats(jnp.diagonal(k)[:b], k)
    return GradientPass(losses=losses, statistics=statistics,
                        weighted_sum=lambda w, stats: weighted_sum(per_example, w[:b]))


def _with_reference(per_example: PyTree, reference: PyTree) -> PyTree:
    if jax.tree_util.tree_structure(reference) != jax.tree_util.tree_structure(per_example):
        raise ValueError("reference_grads must have the same pytree structure as the "
                         "per-example gradients")
    batch_size(reference, name="reference_grads")
    for g, r in zip(jax.tree_util.tree_leaves(per_example),
                    jax.tree_util.tree_leaves(reference)):
        if jnp.shape(g)[1:] != jnp.shape(r)[1:]:
            raise ValueError(f"reference_grads leaf shape {jnp.shape(r)} does not match "
                             f"per-example leaf shape {jnp.shape(g)} beyond the leading axis")
    return jax.tree_util.tree_map(lambda g, r: jnp.concatenate([g, r.astype(g.dtype)]),
                                  per_example, reference)


def explicit_engine(loss_fn: LossFn, *, chunk_size: int | None = None) -> Engine:
    """vmap(grad) per-example gradients (``gujax.per_example_grads``)."""
    def run(params, examples):
        losses, grads = per_example_losses_and_grads(loss_fn, params, examples,
                                                     chunk_size=chunk_size)
        return gradients_pass(grads, losses)
    return Engine("explicit", run)


def ghost_engine(loss_fn: LossFn) -> Engine:
    """``gujax.ghost``: K, its diagonal and the weighted sum from one captured
    forward/backward pass, per-layer ghost or materialised kernels."""
    def run(params, examples):
        tape = capture(loss_fn, params, examples)

        def statistics(cross_terms, dtype=None):
            if not cross_terms:
                return BatchStats(tape_sq_norms(tape))
            # The per-example gradients the Gram materialised go with it, for
            # the update to sum instead of a second weight-gradient pass.
            k, grads = tape_gram_keeping_grads(tape, dtype=dtype)
            return BatchStats(jnp.diagonal(k), k, grads)
        return GradientPass(
            losses=tape.losses, statistics=statistics,
            weighted_sum=lambda w, stats: tape_weighted_grad(tape, params, w,
                                                             kept=dict(stats.materialised or {})))
    return Engine("ghost", run)


ENGINES = {"explicit": explicit_engine, "ghost": ghost_engine}


def make_engine(name: str, loss_fn: LossFn, **kwargs) -> Engine:
    """The engine called ``name`` ("explicit" or "ghost")."""
    if name not in ENGINES:
        raise ValueError(f"method must be one of {tuple(ENGINES)}, got {name!r}")
    return ENGINES[name](loss_fn, **kwargs)


# ----------------------------------------------------------------------------
# Stages.

@dataclasses.dataclass(frozen=True)
class Stage:
    """The gradient stage of a training step.

    init(params) -> state.
    apply(params, batch, state) -> (update, state, metrics): the update to hand
      to the optimiser (shaped like params), the new state, and a dict of 0-d
      metrics ("loss": mean loss over the real rows, "batch_size": their
      number, plus the policy's ``step_metrics()``). A stage is also callable
      as ``stage(params, batch, state)`` (and ``jax.jit(stage)`` works).
    """
    init: Callable[[PyTree], Any]
    apply: Callable[[PyTree, dict, Any], tuple[PyTree, Any, dict]]

    def __call__(self, params, batch, state):
        return self.apply(params, batch, state)


def examples_of(batch: dict) -> dict:
    """The model inputs of a batch: every entry but "id" and "mask"."""
    return {k: v for k, v in batch.items() if k not in RESERVED_KEYS}


def step_metrics(losses: jax.Array, mask: jax.Array | None, state) -> dict:
    """Mean loss and count over the real rows, plus the state's step metrics."""
    if mask is None:
        mask = jnp.ones(losses.shape, bool)
    metrics = {"loss": jnp.sum(jnp.where(mask, losses, 0)) / jnp.maximum(jnp.sum(mask), 1),
               "batch_size": jnp.sum(mask)}
    if hasattr(state, "step_metrics"):
        metrics.update(state.step_metrics())
    return metrics


def policy_step(grad_pass: GradientPass, policy: Policy, state, *, example_ids, mask,
                stats: BatchStats | None = None, dtype: Any = None):
    """One policy decision on an engine's pass: (update, new state, weights).

    The statistics are computed only if not given, the Gram matrix only when
    the policy reads cross terms."""
    if stats is None:
        stats = grad_pass.statistics(policy.cross_terms, dtype)
    weights, state = policy.weights(stats, example_ids, mask, state)
    update, state = policy.finish(grad_pass.weighted_sum(weights, stats), state)
    return update, state, weights


def make_stage(engine: Engine, policy: Policy, *, dtype: Any = None) -> Stage:
    """The stage that runs ``engine`` and lets ``policy`` weigh the examples.

    dtype: dtype of the Gram matrix and of the GNQ solve (``jnp.float64`` with
      x64 enabled gives double-precision GNQ from float32 gradients).
    """
    def apply(params, batch, state):
        grad_pass = engine.run(params, examples_of(batch))
        update, state, _ = policy_step(grad_pass, policy, state,
                                       example_ids=batch.get("id"), mask=batch.get("mask"),
                                       dtype=dtype)
        return update, state, step_metrics(grad_pass.losses, batch.get("mask"), state)
    return Stage(lambda params: policy.init(), apply)


def per_example_stage(loss_fn: LossFn, aggregator: optax.GradientTransformationExtraArgs,
                      *, chunk_size: int | None = None) -> Stage:
    """The stage of an optax transformation over per-example gradients: the
    explicit engine's gradients, then ``aggregator.update(grads, state, params,
    example_ids=, mask=)``. Its state is ``aggregator.init(params)``."""
    def apply(params, batch, state):
        losses, grads = per_example_losses_and_grads(loss_fn, params, examples_of(batch),
                                                     chunk_size=chunk_size)
        update, state = aggregator.update(grads, state, params, example_ids=batch.get("id"),
                                          mask=batch.get("mask"))
        return update, state, step_metrics(losses, batch.get("mask"), state)
    return Stage(aggregator.init, apply)
