"""Argument validation shared by every gujax module.

Each check raises ``ValueError`` with a message that names the argument and
the value it got, and returns the value in canonical form. Static values are
checked before any compute; under ``jax.jit`` a traced value cannot be
checked, and the ``*_or_traced`` checks then let it through (the kernels
define what a bad traced value gives, e.g. NaN scores).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value, name: str, *, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) \
            or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(value)


def positive_finite(value, name: str, *, allow_zero: bool = False, context: str = "") -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``)."""
    ok = _is_real(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}{context}, got {value!r}")
    return float(value)


def positive_finite_or_traced(value, name: str, *, allow_zero: bool = False) -> None:
    """As ``positive_finite`` for a concrete number or array; a tracer passes."""
    if not _is_real(value):
        try:
            value = float(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return
    positive_finite(float(value), name, allow_zero=allow_zero)


def budget(value, name: str = "budget") -> float:
    """A disclosure budget in nats: a number >= 0, inf allowed."""
    if not _is_real(value) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (nats; inf allowed), got {value!r}")
    return float(value)


def probability(value, name: str) -> float:
    """A number strictly between 0 and 1."""
    if not _is_real(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def num_scored(value, n: int) -> int:
    """The number of scored rows among n (default all)."""
    if value is None:
        return n
    if int(value) != value or not 1 <= value <= n:
        raise ValueError(f"num_scored must be an integer in [1, {n}] (the number of rows), "
                         f"got {value!r}")
    return int(value)


def fraction(value, name: str) -> float:
    """A number in [0, 1)."""
    if not _is_real(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def rate(value, name: str = "sample_rate") -> float:
    """A fraction in (0, 1]."""
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def seed(value, name: str = "seed") -> int:
    """A non-negative integer seed."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) \
            or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


def one_of(value, choices, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def mask(value, num_rows: int) -> jax.Array:
    """A (B,) bool mask, False for padding rows; None means every row is real."""
    if value is None:
        return jnp.ones((num_rows,), bool)
    value = jnp.asarray(value)
    if value.shape != (num_rows,) or value.dtype != jnp.bool_:
        raise ValueError(f"mask must be a ({num_rows},) bool array, got "
                         f"{value.dtype} {value.shape}")
    return value


def example_ids(ids, num_rows: int, num_examples: int) -> jax.Array:
    """(B,) integer ids; their range is checked when they are concrete.

    Under ``jax.jit`` the values are tracers and cannot be checked; the
    policies then treat an out-of-range row as padding and count it in the
    step's ``num_bad_ids``.
    """
    if ids is None:
        raise ValueError("example_ids is required: (B,) int training-set indices")
    values = jnp.asarray(ids)
    if values.shape != (num_rows,):
        raise ValueError(f"example_ids must have shape ({num_rows},) (one per batch "
                         f"row), got {values.shape}")
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise ValueError(f"example_ids must be integers, got dtype {values.dtype}")
    if not isinstance(ids, jax.core.Tracer):
        concrete = np.asarray(ids)
        bad = (concrete < 0) | (concrete >= num_examples)
        if bad.any():
            raise ValueError(
                f"example_ids must lie in [0, {num_examples}); got "
                f"{concrete[bad][:5].tolist()} at rows {np.flatnonzero(bad)[:5].tolist()}")
    return values


def subset(values, choices, name: str) -> tuple:
    """A non-empty tuple of values, each one of ``choices`` (order kept)."""
    values = tuple(values)
    unknown = [v for v in values if v not in choices]
    if not values or unknown:
        raise ValueError(f"{name} must be a non-empty subset of {tuple(choices)}, "
                         f"got {list(values)}")
    return values


def boolean_array(value, name: str) -> np.ndarray:
    """A numpy bool array; an array of 0/1 numbers is accepted and converted."""
    value = np.asarray(value)
    if value.dtype != bool:
        if not np.all((value == 0) | (value == 1)):
            raise ValueError(f"{name} must be boolean (or 0/1), got dtype {value.dtype}")
        value = value.astype(bool)
    return value


def labels(labels, num_classes: int, name: str) -> np.ndarray:
    """Integer class labels in [0, num_classes), as an int32 numpy array."""
    values = np.asarray(labels)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {values.dtype}")
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        raise ValueError(f"{name} must lie in [0, {num_classes}); got "
                         f"{values[bad][:5].tolist()} at rows {np.flatnonzero(bad)[:5].tolist()}")
    return values.astype(np.int32)
