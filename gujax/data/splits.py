"""Deterministic subsets and membership assignments for privacy experiments.

Every function here is a pure function of its arguments and an integer seed
(numpy's PCG64 via ``np.random.default_rng``), so the same seed gives the
same split on every machine. Subsets keep the stable ids of the examples they
hold, so per-example results can always be joined back by id.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gujax import checks
from gujax.data.dataset import Dataset


def subset(dataset: Dataset, indices) -> Dataset:
    """The examples at ``indices`` (positions in ``dataset``, in that order), ids kept.

    Raises ValueError for indices that are not 1-D integers in [0, len(dataset))
    or that repeat (a repeated example would carry one id twice).
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array; got {indices.shape} {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= len(dataset)):
        raise ValueError(f"indices must lie in [0, {len(dataset)})")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("indices repeat an example")
    return dataclasses.replace(dataset, images=dataset.images[indices],
                               labels=dataset.labels[indices], ids=dataset.ids[indices])


def random_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``size`` examples drawn without replacement, kept in their original order."""
    checks.seed(seed)
    if not 0 < size <= len(dataset):
        raise ValueError(f"size must be in [1, {len(dataset)}]; got {size}")
    rng = np.random.default_rng(seed)
    return subset(dataset, np.sort(rng.choice(len(dataset), size, replace=False)))


def member_split(dataset: Dataset, num_members: int, seed: int) -> tuple[Dataset, Dataset]:
    """Splits ``dataset`` into disjoint (members, non_members), both in original order.

    The members train the target model; the non-members are held out from the
    same distribution, so a membership attack is scored on equal footing.
    Together they hold every example exactly once.
    """
    checks.seed(seed)
    if not 0 < num_members < len(dataset):
        raise ValueError(f"num_members must be in [1, {len(dataset) - 1}]; got {num_members}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    return (subset(dataset, np.sort(order[:num_members])),
            subset(dataset, np.sort(order[num_members:])))


def shadow_membership(num_examples: int, num_models: int, seed: int, *,
                      balanced: bool = True) -> np.ndarray:
    """Which examples each shadow model trains on.

    ``balanced=True`` (LiRA, Carlini et al. 2022): for every example, an
    independent uniformly random half of the models hold it IN, so each
    column has exactly ``num_models / 2`` True entries and every example gets
    the same number of IN and OUT models to fit its two Gaussians from. A
    model's training-set size is then random, about num_examples / 2.
    Caveat for leave-one-out evaluation (each model in turn the target, the
    rest its shadows): among the other M - 1 models, example j is IN
    M/2 - 1 times if the target holds it and M/2 times if not, so the masks
    themselves reveal the target's membership; an attack must not use them.

    ``balanced=False``: every (model, example) entry is an independent
    Bernoulli(1/2); no count carries information about any other model, at
    the price of uneven IN/OUT counts per example.

    Args:
      num_examples: N, size of the data pool (ids 0..N-1 of the pool).
      num_models: M >= 2, and even when balanced.
      seed: non-negative integer.
      balanced: see above.

    Returns:
      (M, N) bool array; row m is model m's training mask over the pool.
    """
    checks.seed(seed)
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1; got {num_examples}")
    if num_models < 2 or (balanced and num_models % 2):
        raise ValueError(f"num_models must be >= 2, and even when balanced (each example IN "
                         f"exactly half of them); got {num_models}")
    rng = np.random.default_rng(seed)
    uniforms = rng.random((num_models, num_examples))
    if not balanced:
        return uniforms < 0.5
    # argsort of iid uniforms along the model axis is a uniform random
    # permutation per example; its first half is that example's IN set.
    return np.argsort(uniforms, axis=0) < num_models // 2


def canary_membership_design(groups, num_models: int, seed: int) -> np.ndarray:
    """The canary protocol's masks (Aerni, Zhang & Tramer 2024): rows of group
    -1 (the base set) IN in every model; every canary group IN in exactly
    half of the models, the rows of a group (one canary's copies) together.

    Args:
      groups: (N,) int, the group of each pool row, -1 for the always-in
        rows, groups 0..G-1 for the canary rows (``ShadowSpec.groups``).
      num_models: M >= 2, even.
      seed: non-negative integer; the group masks are
        ``shadow_membership(G, M, seed, balanced=True)``.

    Returns:
      (M, N) bool; column j is True everywhere for a base row and equal to
      its group's balanced column for a canary row.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0 or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must be a non-empty 1-D integer array, got {groups.shape} "
                         f"{groups.dtype}")
    canary = groups >= 0
    if np.any(groups < -1):
        raise ValueError("groups must be -1 (always in) or a group index >= 0")
    num_groups = int(groups.max()) + 1 if canary.any() else 0
    if num_groups == 0:
        raise ValueError("no canary row (every group is -1)")
    if len(np.unique(groups[canary])) != num_groups:
        raise ValueError(f"canary groups must be 0..{num_groups - 1}, each with a row")
    by_group = shadow_membership(num_groups, num_models, seed, balanced=True)
    return np.where(canary[None, :], by_group[:, np.maximum(groups, 0)], True)
