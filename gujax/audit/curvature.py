"""Input-loss curvature: the trace of the loss Hessian with respect to the input.

For one example (x, y) with x in R^d (any shape, flattened for the algebra)
and H(x) = d^2 loss(params, x, y) / dx^2 (d x d), the input-loss curvature is
tr H(x) (Ravikumar et al. 2024; Garg et al. 2023 use the related tr H^2).
Averaged over training checkpoints it tracks memorisation, and it is bounded
under differential privacy (seed 001).

Hutchinson's estimator: for Rademacher probes v (entries +-1 with equal
probability) E[v^T H v] = tr H and E[|Hv|^2] = tr H^2. Each H v is exact
(forward-over-reverse: ``jax.jvp`` of ``jax.grad``, one extra pass per probe;
no finite differences, no d x d matrix). With m probes the estimate is the
probe mean and its standard error the probe standard deviation / sqrt(m).
For tr H the variance of one probe is 2 (|H|_F^2 - sum_i H_ii^2): zero for a
diagonal Hessian.

Probes are drawn per example from ``fold_in(key, i)`` (i the example's index),
so an estimate does not depend on ``chunk_size`` or on the other examples.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from gujax.progress import progress_bar

from gujax import checks

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]


class CurvatureEstimate(NamedTuple):
    """Per-example Hutchinson estimates.

    trace: (N,) estimated tr H (or tr H^2 with ``squared=True``), in units of
      loss / input^2 (loss^2 / input^4 for tr H^2).
    stderr: (N,) standard error of each estimate (probe std / sqrt(m)).
    """
    trace: jax.Array
    stderr: jax.Array


def _check_inputs(images, labels) -> int:
    shape = jnp.shape(images)
    if len(shape) < 2:
        raise ValueError(f"images must have shape (N, ...), got {shape}")
    n = shape[0]
    if n == 0:
        raise ValueError("images is empty (N = 0)")
    if jnp.shape(labels)[:1] != (n,):
        raise ValueError(
            f"labels must have leading axis N = {n} to match images, got shape "
            f"{jnp.shape(labels)}")
    if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating):
        raise ValueError(f"images must be floating point (the loss is differentiated "
                         f"with respect to them), got {jnp.asarray(images).dtype}")
    # Traced images (inside jit) cannot be checked here and are trusted.
    if not isinstance(images, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(images))):
        raise ValueError("images contain NaN or Inf")
    return n


def _hvp(loss_fn: LossFn, params, x, y, v):
    """H v for the input Hessian of one example: the derivative of grad_x along v."""
    grad_x = jax.grad(lambda z: loss_fn(params, z, y))
    return jax.jvp(grad_x, (x,), (v,))[1]


def _one_example(loss_fn, params, x, y, key, num_probes, squared):
    probes = jax.random.rademacher(key, (num_probes, *x.shape), dtype=x.dtype)
    hv = jax.vmap(lambda v: _hvp(loss_fn, params, x, y, v))(probes)
    other = hv if squared else probes
    samples = jnp.sum((other * hv).reshape(num_probes, -1), axis=1)
    return jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)


def input_curvature(
    loss_fn: LossFn,
    params: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    key: jax.Array,
    num_probes: int = 64,
    chunk_size: int | None = None,
    squared: bool = False,
) -> CurvatureEstimate:
    """Hutchinson estimate of each example's input-Hessian trace.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` for ONE example (x without
        batch axis). For a Flax model that wants a batch axis:
        ``lambda p, x, y: xent(model.apply({"params": p}, x[None])[0], y)``.
        Must not mix examples (no BatchNorm in training mode).
      params: the model parameters (any pytree).
      images: (N, ...) float inputs, the variable of differentiation.
      labels: (N, ...) whatever ``loss_fn`` takes as y.
      key: PRNG key; probes for example i come from ``fold_in(key, i)``.
      num_probes: Rademacher probes per example, >= 2 (for the standard
        error). The error shrinks as 1 / sqrt(num_probes).
      chunk_size: if given, examples are processed ``chunk_size`` at a time
        (``lax.map``), bounding memory to about chunk_size * num_probes input
        gradients. Same result as unchunked.
      squared: estimate tr H^2 = |H|_F^2 (E|Hv|^2, the Garg et al. quantity)
        instead of tr H.

    Returns:
      CurvatureEstimate(trace (N,), stderr (N,)).
    """
    _check_inputs(images, labels)
    num_probes = checks.positive_int(num_probes, "num_probes", minimum=2)
    if chunk_size is not None:
        chunk_size = checks.positive_int(chunk_size, "chunk_size")
    trace, stderr = _estimate(loss_fn, params, images, labels, key, num_probes, chunk_size,
                              squared)
    return CurvatureEstimate(trace, stderr)


@partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _estimate(loss_fn, params, images, labels, key, num_probes, chunk_size, squared):
    # Compiled once per (loss_fn, shapes, options): the eager vmap of a
    # jvp-of-grad dispatches op by op and is far slower.
    n = images.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))

    def per_example(args):
        x, y, k = args
        return _one_example(loss_fn, params, x, y, k, num_probes, squared)

    if chunk_size is None or chunk_size >= n:
        return jax.vmap(per_example)((images, labels, keys))
    return jax.lax.map(per_example, (images, labels, keys), batch_size=chunk_size)


def curvature_over_checkpoints(
    loss_fn: LossFn,
    checkpoints: Sequence[PyTree],
    images: jax.Array,
    labels: jax.Array,
    *,
    key: jax.Array,
    num_probes: int = 64,
    chunk_size: int | None = None,
    squared: bool = False,
) -> CurvatureEstimate:
    """Input curvature averaged over training checkpoints.

    Ravikumar et al. average the per-example curvature over the checkpoints of
    a run (it is noisy at any single one). Checkpoint c uses the probes of
    ``fold_in(key, c)``, independent across checkpoints, so the standard error
    of the average is sqrt(sum_c stderr_c^2) / C (probe noise only; the
    spread across checkpoints is signal, not error).

    Args:
      checkpoints: a sequence of C >= 1 params pytrees of the same model.
      Everything else as in ``input_curvature``.

    Returns:
      CurvatureEstimate(trace (N,), stderr (N,)): the mean over checkpoints.
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints is empty")
    _check_inputs(images, labels)
    total, var = 0.0, 0.0
    for c, params in enumerate(progress_bar(checkpoints, desc="curvature", unit="ckpt",
                                                leave=False)):
        est = input_curvature(loss_fn, params, images, labels, key=jax.random.fold_in(key, c),
                              num_probes=num_probes, chunk_size=chunk_size, squared=squared)
        total, var = total + est.trace, var + est.stderr ** 2
    count = len(checkpoints)
    return CurvatureEstimate(total / count, jnp.sqrt(var) / count)


def exact_input_hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    squared: bool = False,
) -> jax.Array:
    """(N,) exact tr H (or tr H^2) from the full d x d input Hessian.

    The reference for ``input_curvature``; costs d Hessian-vector products and
    d^2 memory per example, so only for small inputs.
    """
    _check_inputs(images, labels)
    return _exact(loss_fn, params, images, labels, squared)


@partial(jax.jit, static_argnums=(0, 4))
def _exact(loss_fn, params, images, labels, squared):
    def one(x, y):
        d = int(np.prod(x.shape))
        hess = jax.hessian(lambda z: loss_fn(params, z, y))(x).reshape(d, d)
        return jnp.sum(hess * hess) if squared else jnp.trace(hess)

    return jax.vmap(one)(images, labels)
