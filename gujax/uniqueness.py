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

Range: GNQ is unchanged when every gradient is scaled by c and an absolute
lam by c^2, and the kernel keeps it so across the float range. ``gnq``
divides the gradients by a power of two near their largest entry before the
Gram (so a finite row of 1e30 in float32 does not overflow K), and the solve
runs on K' / lam' + I with K' = K divided by a power of two near its largest
diagonal entry and lam' scaled alike (exact: only powers of two). Half
precision (float16, bfloat16 and narrower floats) is accumulated and solved
in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from gujax import checks
from gujax.grads import batch_size, finite_rows, gram

PyTree = Any


def _solve_dtype(dtype, *, requested: bool = False) -> jnp.dtype:
    """The dtype K is accumulated and solved in for data (or a request) of
    ``dtype``: float32 or float64 as given; float32 for a floating type
    narrower than float32 (float16, bfloat16); the default float for
    integers and bools. A ``requested`` dtype the solver cannot use (narrower
    than float32, not a real float) is a ValueError."""
    dt = jnp.dtype(dtype)
    floating = jnp.issubdtype(dt, jnp.floating)
    if floating and jnp.finfo(dt).bits >= 32:
        return jax.dtypes.canonicalize_dtype(dt)
    if requested or jnp.issubdtype(dt, jnp.complexfloating):
        what = "requested dtype" if requested else "gradients' dtype"
        raise ValueError(
            f"GNQ cannot accumulate or solve in {dt.name} (the {what}); it needs "
            "float32 or float64 (half-precision gradients are accumulated in "
            "float32 when no dtype is given)")
    if floating:
        return jnp.dtype(jnp.float32)
    return jax.dtypes.canonicalize_dtype(jnp.result_type(float))


def _pow2(e: jax.Array, dtype) -> jax.Array:
    """2.0 ** e exactly (built from its bits), e an integer array clipped to
    the normal exponents of ``dtype`` (float32 or float64)."""
    info = jnp.finfo(dtype)
    itype = jnp.int32 if info.bits == 32 else jnp.int64
    e = jnp.clip(jnp.asarray(e), info.minexp, info.maxexp - 1).astype(itype)
    return jax.lax.bitcast_convert_type((e + (info.maxexp - 1)) << info.nmant, dtype)


def _scale_exponent(x: jax.Array) -> jax.Array:
    """Integer e with x * 2^-e in [0.5, 1) for a finite x > 0 (as far as
    2^-e is a normal number); 0 for x = 0."""
    info = jnp.finfo(x.dtype)
    return jnp.clip(jnp.frexp(x)[1], 1 - info.maxexp, -info.minexp)


def _times_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
    """x * 2^e for a scalar x and any integer e, in steps that each stay a
    normal power of two (all of one sign, so an intermediate over- or
    underflows only where the result does)."""
    info = jnp.finfo(x.dtype)
    for _ in range(4):   # 4 steps span every exponent sum formed here
        step = jnp.clip(e, info.minexp, info.maxexp - 1)
        x = x * _pow2(step, x.dtype)
        e = e - step
    return x


def regulariser(gram_matrix: jax.Array, reg, *, relative: bool = True,
                valid: jax.Array | None = None) -> jax.Array:
    """The lam actually used: ``reg`` (absolute, squared-gradient units) or
    ``reg * trace(K) / N`` over the valid rows (``relative=True``).

    In K's dtype, float32 for a half-precision K; the trace is summed scaled
    by a power of two, so it does not overflow while lam itself is finite."""
    dt = _solve_dtype(jnp.asarray(gram_matrix).dtype)
    if not relative:
        return jnp.asarray(reg, dt)
    diag = jnp.diagonal(gram_matrix).astype(dt)
    if valid is not None:
        diag = jnp.where(valid, diag, 0)
        count = jnp.maximum(jnp.sum(valid), 1)
    else:
        count = diag.shape[0]
    e = _scale_exponent(jnp.max(jnp.abs(diag)))
    mean = jnp.sum(diag * _pow2(-e, dt)) / count
    return _times_pow2(jnp.asarray(reg, dt) * mean, e)


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
    """GNQ for every row of an N x N Gram matrix; invalid rows give NaN.

    ``k`` is normalised (largest diagonal entry about 1) and solved as
    A = K / lam + I, whose inverse has diagonal lam M_jj: an infinite lam
    (an absolute reg far above every gradient) gives A = I and GNQ = 0."""
    n = k.shape[0]
    both = valid[:, None] & valid[None, :]
    k = jnp.where(both, k, 0)
    # With a valid reg, a zero K (every valid gradient zero) gives GNQ = 0 for
    # any lam, and 1 keeps the factorisation defined; a lam that underflowed
    # is raised to the smallest normal number.
    nonzero = jnp.max(jnp.abs(jnp.diagonal(k))) > 0
    lam = jnp.where(nonzero, jnp.maximum(lam, jnp.finfo(k.dtype).tiny),
                    jnp.ones_like(lam))
    a = k / lam + jnp.eye(n, dtype=k.dtype)
    chol_inv = _inverse_cholesky_factor(a)
    m_diag = jnp.sum(chol_inv * chol_inv, axis=0)  # [L^-T L^-1]_jj = lam M_jj
    scores = 1.0 / m_diag - 1.0
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
      (num_scored,) GNQ, dtype of ``gram_matrix`` (float32 for a
      half-precision K: float16 and bfloat16 are solved in float32). NaN for
      a row whose Gram entries are not finite (its gradient held NaN/Inf);
      that row is left out of everyone else's S_-j. K and lam are divided by
      a power of two near K's largest finite diagonal entry before the
      solve, so the scores do not depend on the scale of K (with lam scaled
      alike) as long as K itself is finite.
    """
    k = jnp.asarray(gram_matrix)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"gram_matrix must be square (N, N), got shape {k.shape}")
    n = k.shape[0]
    if n == 0:
        raise ValueError("gram_matrix is empty (N = 0)")
    checks.positive_finite_or_traced(reg, "reg")
    num_scored = checks.num_scored(num_scored, n)
    k = k.astype(_solve_dtype(k.dtype))
    # A non-finite gradient shows on the diagonal; its row and column are then
    # ignored, and any other row still holding a non-finite entry is dropped.
    diag_ok = jnp.isfinite(jnp.diagonal(k))
    valid = diag_ok & jnp.all(jnp.isfinite(k) | ~diag_ok[None, :], axis=1)
    return _gnq_valid(k, reg, relative, num_scored, valid)


def _split_reg(reg):
    """(mantissa, exponent) with reg = mantissa * 2^exponent: exact from the
    float64 value of a concrete reg (so an absolute reg outside the float32
    range still serves gradients scaled alike), (reg, 0) for a traced one."""
    try:
        value = float(reg)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return reg, 0
    return math.frexp(value)


def _gnq_valid(k, reg, relative, num_scored, valid, log2_scale=0):
    """GNQ of the valid rows of K = k * 2^log2_scale (k finite on them)."""
    k = jnp.where(valid[:, None] & valid[None, :], k, 0)
    # Normalise: the largest diagonal entry to [0.5, 1), exactly (a power of
    # two), and an absolute lam with it; a relative lam is scale-free.
    e = _scale_exponent(jnp.max(jnp.abs(jnp.diagonal(k))))
    k = k * _pow2(-e, k.dtype)
    mantissa, reg_exp = _split_reg(reg)
    # A traced reg cannot be checked before the call; one that is zero,
    # negative, infinite or NaN gives NaN for every score.
    reg_ok = jnp.isfinite(mantissa) & (jnp.asarray(mantissa) > 0)
    mantissa = jnp.asarray(mantissa, k.dtype)
    if relative:
        lam = _times_pow2(regulariser(k, mantissa, relative=True, valid=valid), reg_exp)
    else:
        lam = _times_pow2(mantissa, reg_exp - e - log2_scale)
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
        enabled gives double-precision GNQ from float32 gradients). Default:
        the gradients' dtype, float32 for half-precision gradients (float16,
        bfloat16: the solver needs float32 or wider). A dtype narrower than
        float32, or not a real float, is a ValueError.

    Returns:
      (num_scored,) GNQ scores in that dtype; NaN for an example whose
      gradient is not finite, which is also excluded from everyone else's
      S_-j. The finite gradients are divided by a power of two near their
      largest entry before the Gram (reg scaled alike when absolute), so the
      scores do not depend on the gradients' scale, and a finite but huge row
      does not overflow K for the others.
    """
    n = batch_size(per_example_grads, name="per_example_grads")
    checks.positive_finite_or_traced(reg, "reg")
    num_scored = checks.num_scored(num_scored, n)
    if dtype is None:
        dt = _solve_dtype(jnp.result_type(*jax.tree_util.tree_leaves(per_example_grads)))
    else:
        dt = _solve_dtype(dtype, requested=True)
    valid = finite_rows(per_example_grads)
    clean = jax.tree_util.tree_map(
        lambda g: jnp.where(valid.reshape((n,) + (1,) * (g.ndim - 1)), g.astype(dt), 0),
        per_example_grads)
    largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(g), initial=0) for g in
                                             jax.tree_util.tree_leaves(clean)])
    e = _scale_exponent(largest)
    scale = _pow2(-e, dt)
    k = gram(jax.tree_util.tree_map(lambda g: g * scale, clean), dtype=dt)
    return _gnq_valid(k, reg, relative, num_scored, valid, log2_scale=2 * e)


def disclosure(gnq_scores: jax.Array) -> jax.Array:
    """Per-step disclosure bound d = 1/2 log(1 + GNQ), in nats (NaN stays NaN)."""
    return 0.5 * jnp.log1p(gnq_scores)
