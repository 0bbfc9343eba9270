"""Ghost gradient stages for ``gujax.train.train(..., gradient_stage=...)``.

A stage is ``(params, batch, aggregator_state) -> (update, new_state,
metrics)`` with ``batch = {"image", "label", "id", "mask"}``. These compute
the same update, state and metrics as ``gujax.train.per_example_stage`` with
the matching aggregator, without materialising per-example gradients:

    GNQ:     capture -> ghost K -> policy weights -> sum_j w_j g_j
    DP-SGD:  capture -> per-example norms -> clipped sum + noise
    DP-SGD with a disclosure ledger: capture -> ghost K -> clip factors,
             ledger on the scaled K -> clipped sum + noise

Use them with the aggregator whose state they share:

    policy = gujax.transforms.censor_policy(budget=2.0, num_examples=n, reg=1e-2)
    train(aggregator=gujax.transforms.policy_transformation(policy),
          gradient_stage=gnq_stage(loss_fn, policy), ...)

    agg = gujax.dpsgd.dpsgd_aggregate(l2_norm_clip=C, noise_multiplier=s,
                                      expected_batch_size=q * n, seed=0)
    train(aggregator=agg, gradient_stage=dpsgd_stage(
        loss_fn, l2_norm_clip=C, noise_multiplier=s, expected_batch_size=q * n), ...)

    agg = gujax.dpsgd.dpsgd_monitor(l2_norm_clip=C, noise_multiplier=s,
                                    expected_batch_size=q * n, seed=0, num_examples=n)
    train(aggregator=agg, gradient_stage=dpsgd_monitor_stage(
        loss_fn, l2_norm_clip=C, expected_batch_size=q * n), ...)
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from gujax.dpsgd import DpsgdMonitorState, add_noise, charge_ledger, clip_factors_from_norms
from gujax.ghost.capture import LossFn, capture
from gujax.ghost.clipping import _check_mask, _check_positive, ghost_dpsgd
from gujax.ghost.gram import tape_gram, tape_weighted_grad

PyTree = Any


def _examples(batch: dict) -> dict:
    return {"image": batch["image"], "label": batch["label"]}


def _metrics(losses, mask, state) -> dict:
    """The same metrics as ``gujax.train.per_example_stage``."""
    metrics = {"loss": jnp.sum(jnp.where(mask, losses, 0)) / jnp.maximum(jnp.sum(mask), 1),
               "batch_size": jnp.sum(mask)}
    if hasattr(state, "step_metrics"):
        metrics.update(state.step_metrics())
    return metrics


def gnq_stage(loss_fn: LossFn, policy, *, dtype: Any = None) -> Callable:
    """Ghost stage for a ``gujax.transforms`` Gram policy (monitor, censor, clip).

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` with example
        ``{"image": (H, W, C), "label": ()}``.
      policy: a ``GnqPolicy`` (``monitor_policy``, ``censor_policy``,
        ``clip_policy``); the stage's state is ``policy.init()``.
      dtype: dtype of the Gram matrix (``jnp.float64`` with x64 enabled).
    """
    def stage(params, batch, state):
        tape = capture(loss_fn, params, _examples(batch))
        gram = tape_gram(tape, dtype=dtype)
        weights, state = policy.weights(gram, batch["id"], batch["mask"], state)
        update = tape_weighted_grad(tape, params, weights)
        return update, state, _metrics(tape.losses, batch["mask"], state)
    return stage


def dpsgd_stage(loss_fn: LossFn, *, l2_norm_clip: float, noise_multiplier: float,
                expected_batch_size: float) -> Callable:
    """Ghost-clipping stage equal to ``per_example_stage(loss_fn,
    dpsgd_aggregate(...))`` with the same settings (its state is that
    aggregator's ``init``)."""
    def stage(params, batch, state):
        update, state, info = ghost_dpsgd(
            loss_fn, params, _examples(batch), state, l2_norm_clip=l2_norm_clip,
            noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
            mask=batch["mask"])
        return update, state, _metrics(info.losses, batch["mask"], state)
    return stage


def dpsgd_monitor_stage(loss_fn: LossFn, *, l2_norm_clip: float, expected_batch_size: float,
                        dtype: Any = None) -> Callable:
    """Ghost stage equal to ``per_example_stage(loss_fn, dpsgd_monitor(...))``.

    DP-SGD's update (sum_j clip(g_j) + N(0, sigma^2 C^2 I)) / expected_batch_size
    plus the GNQ disclosure ledger over the clipped gradients with the floor
    sigma^2 C^2, as ``gujax.dpsgd.dpsgd_monitor``: the same update (same noise
    key schedule), new ``DpsgdMonitorState`` and metrics, to rounding. Its
    state is that aggregator's ``init``: sigma, the noise key and the ledger
    size are read from it, so only the static settings are arguments.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar`` with example
        ``{"image": (H, W, C), "label": ()}``.
      l2_norm_clip: C > 0 (gradient-norm units), as given to ``dpsgd_monitor``.
      expected_batch_size: the update's denominator, as given to it.
      dtype: dtype of the Gram matrix and solve (``jnp.float64`` with x64).
    """
    _check_positive(l2_norm_clip, "l2_norm_clip")
    _check_positive(expected_batch_size, "expected_batch_size")

    def stage(params, batch, state: DpsgdMonitorState):
        tape = capture(loss_fn, params, _examples(batch))
        b = tape.losses.shape[0]
        mask = _check_mask(batch["mask"], b)
        k = tape_gram(tape, dtype=dtype)
        sq = jnp.diagonal(k)
        # A NaN/Inf anywhere in g_j shows on its squared norm.
        finite = jnp.isfinite(sq)
        keep = finite & mask
        # dpsgd_monitor zeroes dropped rows before anything else: their K
        # rows are 0 and their clip factor is 1 (a zero gradient).
        k = jnp.where(keep[:, None] & keep[None, :], k, 0)
        c = clip_factors_from_norms(jnp.sqrt(jnp.where(keep, sq, 0)), l2_norm_clip)
        ledger = charge_ledger(k, c, finite, batch["id"], mask, state,
                               l2_norm_clip=l2_norm_clip)
        clipped = tape_weighted_grad(tape, params, jnp.where(keep, c, 0))
        update, state = add_noise(clipped, ledger, state, l2_norm_clip=l2_norm_clip,
                                  expected_batch_size=expected_batch_size)
        return update, state, _metrics(tape.losses, mask, state)
    return stage
