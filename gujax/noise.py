"""The Gaussian mechanism's noise: how DP-SGD (and every other Gaussian
release in gujax) draws N(0, std^2) per coordinate.

``Noise`` is the typed choice of generator: the key implementation
(``jax.random.key(seed, impl=)``) and the draw schedule. Every choice gives
another noise stream for the same seed and the same distribution, i.i.d.
N(0, std^2) over every coordinate (tests/test_privacy.py):

    per_leaf  optax's schedule (``differentially_private_aggregate``):
              ``next_key, *leaf_keys = split(key, num_leaves + 1)``, one key
              and one draw per leaf in tree order
    flat      ``next_key, k = split(key)`` and one draw of sum(leaf sizes)
              normals with ``k``, cut into the leaves in tree order: one
              generator call per step instead of one per leaf
    paired    as flat, but the normals' bits are JAX's non-partitionable
              threefry stream (``jax_threefry_partitionable=False``): each
              threefry2x32 block gives two 32-bit words, where the
              partitionable default XORs them into one, so half the hash
              evaluations. The count is padded to a multiple of
              ``PAIRED_BLOCK`` words (XLA:CPU ran the odd-sized draw 5x
              slower) and cut. threefry2x32 keys only; bit for bit
              ``jax.random.normal(k, (n,))`` in that mode (tests/test_privacy.py)

Measured on the idle 2-core CPU (670k normals, the jitted draw alone;
docs/performance.md): threefry2x32 5.2 ms per leaf or flat (its cost is the
bits), rbg 12.4 -> 5.7 ms flat, unsafe_rbg 16.1 -> 6.4 ms flat. On GPUs and
TPUs the rbg generators are the fast ones.

``clipped_gaussian_sum_numpy`` is the same mechanism on the host, in numpy,
for statistics computed outside a training step (``gujax.features``' private
standardisation); a test holds it equal in distribution to the JAX path.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

from gujax import checks

PyTree = Any

KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
SCHEDULES = ("per_leaf", "flat", "paired")
PAIRED_BLOCK = 2048  # words; the paired draw's padding (module docstring)


@dataclasses.dataclass(frozen=True)
class Noise:
    """How Gaussian noise is drawn: ``impl`` one of ``KEY_IMPLS`` (JAX's
    default threefry2x32; rbg and unsafe_rbg are faster on accelerators) and
    ``schedule`` one of ``SCHEDULES``."""
    impl: str = "threefry2x32"
    schedule: str = "per_leaf"

    def __post_init__(self):
        checks.one_of(self.impl, KEY_IMPLS, "noise impl")
        checks.one_of(self.schedule, SCHEDULES, "noise schedule")
        if self.schedule == "paired" and self.impl != "threefry2x32":
            raise ValueError(f"noise schedule 'paired' reads threefry2x32 blocks; it cannot "
                             f"take {self.impl!r} keys (use 'flat')")

    def key(self, seed: int) -> jax.Array:
        """The first key of the stream seeded by ``seed``."""
        return jax.random.key(seed, impl=self.impl)

    def draw(self, key: jax.Array, like: PyTree, std) -> tuple[PyTree, jax.Array]:
        """N(0, std^2) per coordinate shaped like ``like``, and the next key."""
        return gaussian_noise(key, like, std, flat=self.schedule != "per_leaf",
                              normal=paired_normal if self.schedule == "paired" else _normal)

    @property
    def label(self) -> str:
        """"" for the default, else e.g. "rbg" or "rbg flat"."""
        parts = [p for p, d in ((self.impl, "threefry2x32"), (self.schedule, "per_leaf"))
                 if p != d]
        return " ".join(parts)


CHOICES = tuple(Noise(impl, schedule) for impl in KEY_IMPLS for schedule in SCHEDULES
                if schedule != "paired" or impl == "threefry2x32")


def _normal(key: jax.Array, n: int, dtype) -> jax.Array:
    return jax.random.normal(key, (n,), dtype)


def gaussian_noise(key: jax.Array, like: PyTree, std, *, flat: bool = False,
                   normal=_normal) -> tuple[PyTree, jax.Array]:
    """N(0, std^2) per coordinate, shaped like ``like``, and the next key
    (the ``per_leaf`` schedule, or ``flat``; module docstring). ``normal(key,
    n, dtype)`` is the flat draw (``paired_normal`` for the paired schedule).
    The schedules give different noise for the same key (with JAX's
    partitionable threefry the first leaf may coincide), with the same
    distribution. Leaves of different dtypes are drawn in their promoted
    dtype and cast."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if not flat:
        next_key, *keys = jax.random.split(key, len(leaves) + 1)
        noise = [jnp.asarray(std).astype(g.dtype) * jax.random.normal(k, jnp.shape(g), g.dtype)
                 for g, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(treedef, noise), next_key
    next_key, k = jax.random.split(key)
    sizes = [math.prod(jnp.shape(g)) for g in leaves]
    z = normal(k, sum(sizes), jnp.result_type(*leaves) if leaves else float)
    noise, start = [], 0
    for g, size in zip(leaves, sizes):
        piece = jax.lax.slice_in_dim(z, start, start + size).reshape(jnp.shape(g))
        noise.append(jnp.asarray(std).astype(g.dtype) * piece.astype(g.dtype))
        start += size
    return jax.tree_util.tree_unflatten(treedef, noise), next_key


def paired_normal(key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
    """(n,) N(0, 1) from a threefry2x32 ``key``, both words of every block
    used: JAX's non-partitionable threefry stream of m = n padded to
    ``PAIRED_BLOCK`` words (block i hashes the counters (i, m/2 + i); words
    1 and 2 are stream positions i and m/2 + i), through jax.random.normal's
    own transform (23 mantissa bits to a uniform on (-1, 1), then sqrt(2)
    erfinv). Dtypes wider than 32 bits take JAX's own draw, which already
    reads both words."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize > 4:
        return jax.random.normal(key, (n,), dtype)
    half = max(1, -(-n // PAIRED_BLOCK)) * PAIRED_BLOCK // 2
    data = jax.random.key_data(key)
    count = lax.iota(jnp.uint32, half)
    words = threefry2x32_p.bind(data[0], data[1], count, count + jnp.uint32(half))
    return jnp.concatenate([_normal_from_bits(w) for w in words])[:n].astype(dtype)


def _normal_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 words -> float32 N(0, 1), jax.random.normal's transform."""
    mantissa = lax.shift_right_logical(bits, jnp.uint32(32 - 23)) | jnp.uint32(0x3F800000)
    unit = lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0        # [0, 1)
    low = jnp.nextafter(jnp.float32(-1), jnp.float32(0))
    uniform = jnp.maximum(low, unit * (1.0 - low) + low)
    return jnp.sqrt(jnp.float32(2)) * lax.erf_inv(uniform)


def clip_factors(sq_norms: jax.Array, l2_norm_clip, keep: jax.Array) -> jax.Array:
    """(B,) min(1, C / ||g_j||) for the kept rows with a finite norm, else 0
    (a dropped row contributes nothing). A zero norm gets factor 1."""
    norms = jnp.sqrt(jnp.where(keep, sq_norms, 0))
    factors = jnp.where(norms > l2_norm_clip, l2_norm_clip / jnp.where(norms > 0, norms, 1), 1.0)
    return jnp.where(keep & jnp.isfinite(sq_norms), factors, 0.0)


def clipped_gaussian_sum_numpy(values: np.ndarray, l2_norm_clip: float,
                               noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """The Gaussian mechanism on host rows: sum_j min(1, C / ||v_j||) v_j +
    N(0, (sigma C)^2 I), for (N, D) float rows; the numpy twin of
    ``clip_factors`` plus ``Noise.draw`` (equal in distribution,
    tests/test_privacy.py). ``rng`` is consumed by one normal draw of D."""
    values = np.asarray(values, np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    # clip_factors' rule in float64 (a zero norm gets factor 1).
    clipped = values * np.minimum(1.0, l2_norm_clip / np.maximum(norms, 1e-30))
    return clipped.sum(0) + rng.normal(0.0, noise_multiplier * l2_norm_clip, values.shape[1])
