"""Gradient uniqueness (GNQ): leave-one-out disclosure of each example in a step.

For per-example gradients g_1..g_N (N = B scored rows + R reference rows) and
example j,

    S_-j  = sum_{k != j} g_k g_k^T + lam I_P
    GNQ_j = g_j^T S_-j^{-1} g_j                         (dimensionless, >= 0)

computed in batch space (never a P x P matrix): with K = G G^T and
M = (K + lam I_N)^{-1}, Sherman-Morrison gives

    GNQ_j = 1 / (lam * M_jj) - 1

which needs one Cholesky factor of K + lam I (O(N^3)) after the O(N^2 P) Gram
matrix. ``disclosure`` turns GNQ into the Gaussian-channel bound
d_j = 1/2 log(1 + GNQ_j) nats (see the README for the assumption behind it).

Non-finite gradients: an example whose gradient holds NaN or Inf is dropped
from K (as if its gradient were zero, so it is not part of anyone's S_-j) and
its own score is NaN; every other score is what it would be without it.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gujax import checks
from gujax.grads import batch_size, finite_rows, gram

PyTree = Any


def regulariser(gram_matrix: jax.Array, reg, *, relative: bool = True,
                valid: jax.Array | None = None) -> jax.Array:
    """The lam actually used: ``reg`` (absolute, squared-gradient units) or
    ``reg * trace(K) / N`` over the valid rows (``relative=True``)."""
    if not relative:
        return jnp.asarray(reg, gram_matrix.dtype)
    diag = jnp.diagonal(gram_matrix)
    if valid is not None:
        diag = jnp.where(valid, diag, 0)
        count = jnp.maximum(jnp.sum(valid), 1)
    else:
        count = diag.shape[0]
    return jnp.asarray(reg, gram_matrix.dtype) * jnp.sum(diag) / count


_DIRECT_SOLVE_MAX = 64


def _inverse_cholesky_factor(a: jax.Array) -> jax.Array:
    """L^-1 for the Cholesky factor L of the SPD matrix ``a`` (N, N).

    Blocked by halves: with L11^-1 of the leading block, L21 = A21 L11^-T,
    the Schur complement A22 - L21 L21^T gives L22^-1, and
    L^-1_21 = -L22^-1 L21 L11^-1. The same flops as Cholesky plus a
    triangular solve against I, but as matrix products, which XLA:CPU runs
    2-2.7x faster than its triangular solve for N >= 256 (256: 0.6 ms against
    1.2 ms; docs/performance.md)."""
    n = a.shape[0]
    if n <= _DIRECT_SOLVE_MAX:
        return jax.scipy.linalg.solve_triangular(
            jnp.linalg.cholesky(a), jnp.eye(n, dtype=a.dtype), lower=True)
    # HIGHEST: a solve must not run in TF32/bf16 where accelerators default to it.
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    h = n // 2
    inv11 = _inverse_cholesky_factor(a[:h, :h])
    l21 = mm(a[h:, :h], inv11.T)
    inv22 = _inverse_cholesky_factor(a[h:, h:] - mm(l21, l21.T))
    inv21 = -mm(inv22, mm(l21, inv11))
    return jnp.block([[inv11, jnp.zeros((h, n - h), a.dtype)], [inv21, inv22]])


def _loo_gnq(k: jax.Array, lam: jax.Array, valid: jax.Array) -> jax.Array:
    """GNQ for every row of an N x N Gram matrix; invalid rows give NaN."""
    n = k.shape[0]
    both = valid[:, None] & valid[None, :]
    k = jnp.where(both, k, 0)
    # With a valid reg, a zero lam means a zero trace: every valid gradient is
    # zero, any lam gives GNQ = 0, and 1 keeps the factorisation defined.
    lam = jnp.where(lam > 0, lam, jnp.ones_like(lam))
    a = k + lam * jnp.eye(n, dtype=k.dtype)
    chol_inv = _inverse_cholesky_factor(a)
    m_diag = jnp.sum(chol_inv * chol_inv, axis=0)  # [L^-T L^-1]_jj
    scores = 1.0 / (lam * m_diag) - 1.0
    # Rounding can push an exact zero slightly negative.
    scores = jnp.maximum(scores, 0)
    return jnp.where(valid, scores, jnp.nan)


def gnq_from_gram(gram_matrix: jax.Array, *, reg, relative: bool = True,
                  num_scored: int | None = None) -> jax.Array:
    """Leave-one-out GNQ from a precomputed Gram matrix.

    Args:
      gram_matrix: (N, N) K_jk = <g_j, g_k>; rows [0, num_scored) are scored,
        the remaining R = N - num_scored rows are reference examples that
        enter every S_-j but get no score.
      reg: the regulariser. With ``relative=True`` lam = reg * trace(K) / N
        (scale-free); otherwise lam = reg in squared-gradient units (for
        DP-SGD noise N(0, sigma^2 C^2 I) on the clipped sum, sigma^2 C^2).
        A concrete reg must be a finite number > 0 (ValueError otherwise); a
        traced reg that is not gives NaN for every score.
      num_scored: number of scored rows (default: all N).

    Returns:
      (num_scored,) GNQ, dtype of ``gram_matrix``. NaN for a row whose Gram
      entries are not finite (its gradient held NaN/Inf); that row is left
      out of everyone else's S_-j.
    """
    k = jnp.asarray(gram_matrix)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"gram_matrix must be square (N, N), got shape {k.shape}")
    n = k.shape[0]
    if n == 0:
        raise ValueError("gram_matrix is empty (N = 0)")
    checks.positive_finite_or_traced(reg, "reg")
    num_scored = checks.num_scored(num_scored, n)
    if not jnp.issubdtype(k.dtype, jnp.floating):
        k = k.astype(jnp.result_type(float))
    # A non-finite gradient shows on the diagonal; its row and column are then
    # ignored, and any other row still holding a non-finite entry is dropped.
    diag_ok = jnp.isfinite(jnp.diagonal(k))
    valid = diag_ok & jnp.all(jnp.isfinite(k) | ~diag_ok[None, :], axis=1)
    return _gnq_valid(k, reg, relative, num_scored, valid)


def _gnq_valid(k, reg, relative, num_scored, valid):
    lam = regulariser(jnp.where(valid[:, None] & valid[None, :], k, 0), reg,
                      relative=relative, valid=valid)
    # A traced reg cannot be checked before the call; one that is zero,
    # negative, infinite or NaN gives NaN for every score.
    reg_ok = jnp.isfinite(reg) & (jnp.asarray(reg) > 0)
    return jnp.where(reg_ok, _loo_gnq(k, lam, valid), jnp.nan)[:num_scored]


def gnq(per_example_grads: PyTree, *, reg, relative: bool = True,
        num_scored: int | None = None, dtype: Any = None) -> jax.Array:
    """Leave-one-out GNQ of each example from its per-example gradient.

    Args:
      per_example_grads: pytree whose leaves have a common leading axis N
        (output of ``gujax.per_example_grads``, possibly with R reference
        examples appended after the ``num_scored`` scored ones).
      reg, relative, num_scored: as in ``gnq_from_gram``.
      dtype: dtype for the Gram matrix and the solve (``jnp.float64`` with x64
        enabled gives double-precision GNQ from float32 gradients).

    Returns:
      (num_scored,) GNQ scores; NaN for an example whose gradient is not
      finite, which is also excluded from everyone else's S_-j.
    """
    n = batch_size(per_example_grads, name="per_example_grads")
    checks.positive_finite_or_traced(reg, "reg")
    num_scored = checks.num_scored(num_scored, n)
    valid = finite_rows(per_example_grads)
    clean = jax.tree_util.tree_map(
        lambda g: jnp.where(valid.reshape((n,) + (1,) * (g.ndim - 1)), g, 0),
        per_example_grads)
    k = gram(clean, dtype=dtype)
    return _gnq_valid(k, reg, relative, num_scored, valid)


def disclosure(gnq_scores: jax.Array) -> jax.Array:
    """Per-step disclosure bound d = 1/2 log(1 + GNQ), in nats (NaN stays NaN)."""
    return 0.5 * jnp.log1p(gnq_scores)
