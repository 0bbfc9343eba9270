"""What a shadow-model run is and what it leaves: ``ShadowSpec`` (the models
to train), ``ShadowModel`` (one trained model's arrays and summary, as kept
in memory and on disk) and ``ShadowRecord`` (all M models stacked, what the
attacks read)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from gujax import checks
from gujax.arms import Arm
from gujax.data.dataset import Dataset
from gujax.train import TrainConfig

# Query augmentations: name -> function of a float batch (B, H, W, C).
AUGMENTATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "flip": lambda x: x[:, :, ::-1],
}


@dataclasses.dataclass(frozen=True)
class ShadowSpec:
    """The shadow models of one arm: what to train and how to query them.

    arm: the training algorithm (``gujax.arms.Arm``).
    model: Flax Linen classifier; config: ``TrainConfig`` (its seed and
      sampling are set per model and per arm, its learning rate unless the
      arm overrides it; ``eval_batch_size`` is the query batch).
    num_models: M >= 2 (each target needs shadows).
    seed: seeds the membership masks, inits, sampling and noise.
    augmentations: query augmentations, names in ``AUGMENTATIONS``.
    method: gradient engine, "ghost" or "explicit"
      (``gujax.arms.train_runs``; not part of the run's identity: both
      engines train the same models to rounding).
    always_in: the canary protocol (Aerni, Zhang & Tramer 2024): the first
      ``always_in`` pool rows (the base set) are IN in every model, and only
      the remaining rows (the canaries) vary. 0 (the default): the
      population protocol, every row an independent Bernoulli(1/2).
    canary_groups: the canary rows after the base set, as blocks
      ((count, size), ...): ``count`` groups of ``size`` consecutive rows,
      the rows of a group IN or OUT together (a canary's copies). () = each
      canary row its own group. Under the canary protocol (``always_in`` > 0
      or ``canary_groups`` given) every group is IN in exactly half of the
      models (balanced: ``gujax.data.splits.canary_membership_design``), so
      ``num_models`` must be even.
    """
    arm: Arm
    model: Any
    config: TrainConfig
    num_models: int
    seed: int = 0
    augmentations: tuple[str, ...] = ("identity", "flip")
    method: str = "ghost"
    always_in: int = 0
    canary_groups: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        checks.positive_int(self.num_models, "num_models (each target needs shadows)",
                            minimum=2)
        if isinstance(self.always_in, bool) or not isinstance(self.always_in, (int, np.integer)) \
                or self.always_in < 0:
            raise ValueError(f"always_in must be an integer >= 0, got {self.always_in!r}")
        object.__setattr__(self, "always_in", int(self.always_in))
        blocks = tuple((int(c), int(k)) for c, k in self.canary_groups)
        if any(c < 1 or k < 1 for c, k in blocks):
            raise ValueError(f"canary_groups must be (count >= 1, size >= 1) blocks, got "
                             f"{list(self.canary_groups)}")
        object.__setattr__(self, "canary_groups", blocks)
        if self.canary_protocol and self.num_models % 2:
            raise ValueError(f"the canary protocol puts each canary IN in exactly half of the "
                             f"models: num_models must be even, got {self.num_models}")
        object.__setattr__(self, "augmentations", checks.subset(
            self.augmentations, tuple(sorted(AUGMENTATIONS)), "augmentations"))

    @classmethod
    def of(cls, arm: Arm | ShadowSpec, **fields) -> ShadowSpec:
        """``arm`` itself if it is a spec, else ``ShadowSpec(arm, **fields)``."""
        if isinstance(arm, ShadowSpec):
            if fields:
                raise TypeError(f"got a ShadowSpec and also {sorted(fields)}; pass one or "
                                f"the other (dataclasses.replace(spec, ...) to change it)")
            return arm
        return cls(arm, **fields)

    @property
    def canary_protocol(self) -> bool:
        """Base set always IN, balanced canary groups (see the fields)."""
        return self.always_in > 0 or bool(self.canary_groups)

    def groups(self, num_rows: int) -> np.ndarray | None:
        """(num_rows,) int64: the canary group of each pool row, -1 for the
        always-in rows; None outside the canary protocol. ``ValueError`` if
        the blocks do not cover the rows after the base set exactly."""
        if not self.canary_protocol:
            return None
        return canary_group_index(self.always_in, self.canary_groups, num_rows)


def canary_group_index(always_in: int, canary_groups, num_rows: int) -> np.ndarray:
    """(num_rows,) int64 group of each row of a canary-protocol pool: -1 for
    the first ``always_in`` rows, then ``canary_groups`` blocks ((count,
    size), ...; () = one row per group). ``ValueError`` unless the blocks
    cover the rows after the base set exactly."""
    canaries = num_rows - always_in
    if canaries < 1:
        raise ValueError(f"always_in ({always_in}) leaves no canary in the "
                         f"{num_rows}-row pool")
    blocks = tuple(canary_groups) or ((canaries, 1),)
    covered = sum(c * k for c, k in blocks)
    if covered != canaries:
        raise ValueError(f"canary_groups cover {covered} rows, but the pool holds "
                         f"{canaries} rows after the {always_in} always-in ones")
    sizes = np.concatenate([np.full(c, k, np.int64) for c, k in blocks])
    return np.concatenate([np.full(always_in, -1, np.int64),
                           np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)])


# The arrays a model's .npz holds, and their dtypes.
MODEL_ARRAYS = {"logits": np.float32, "population_logits": np.float32,
                "disclosure": np.float32, "cumulative_gnq": np.float32,
                "steps_used": np.int32, "retired": bool}


class ShadowModel(NamedTuple):
    """One trained shadow model m.

    arrays: ``MODEL_ARRAYS`` names -> logits (N, A, C) on the pool and
      (Z, A, C) on the population, ledger arrays (N,) indexed by pool position.
    summary: JSON-ready dict: model, num_train, wall_seconds, trained_with,
      group_wall_seconds, train_accuracy, test_accuracy, noise_multiplier,
      epsilon (None without DP-SGD), learning_rate, sampling, final_loss.
    """
    arrays: dict[str, np.ndarray]
    summary: dict


class ShadowRecord(NamedTuple):
    """Everything M trained shadow models of one arm left behind.

    Pool of N examples, population of Z, A query augmentations, C classes.
      arm: the arm's ``to_json()``.
      pool_ids (N,) int64, pool_labels (N,) int32: the pool, in order.
      population_labels (Z,) int32.
      augmentations: names of the A query augmentations.
      in_mask (M, N) bool: model m trained on pool example j.
      logits (M, N, A, C) float32; population_logits (M, Z, A, C) float32.
      disclosure (M, N) float32: D_j in nats in model m's run (0 when OUT).
      cumulative_gnq (M, N) float32: sum of realised GNQ (0 when OUT).
      steps_used (M, N) int32: steps whose update contained j.
      retired (M, N) bool: refused for good by a censoring arm.
      train_accuracy, test_accuracy (M,): accuracy (identity query) on the
        model's own training examples and on the population (the test split).
      wall_seconds (M,): training time of each model (s), compilation included.
      noise_multiplier, epsilon (M,): DP-SGD's sigma and accounted epsilon
        (NaN for arms without them).
      groups (N,) int64 or None: the canary protocol's group of each row, -1
        for the always-in base rows (``ShadowSpec.groups``); None under the
        population protocol.
    """
    arm: dict
    pool_ids: np.ndarray
    pool_labels: np.ndarray
    population_labels: np.ndarray
    augmentations: tuple[str, ...]
    in_mask: np.ndarray
    logits: np.ndarray
    population_logits: np.ndarray
    disclosure: np.ndarray
    cumulative_gnq: np.ndarray
    steps_used: np.ndarray
    retired: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    wall_seconds: np.ndarray
    noise_multiplier: np.ndarray
    epsilon: np.ndarray
    groups: np.ndarray | None = None


def assemble_record(models: Sequence[ShadowModel], *, arm: dict, augmentations,
                    pool: Dataset, population: Dataset, in_mask: np.ndarray,
                    groups: np.ndarray | None = None) -> ShadowRecord:
    """Stack models 0..M-1 (in that order) into a ``ShadowRecord``."""
    def stack(key):
        return np.stack([m.arrays[key] for m in models])

    def column(key):
        return np.array([np.nan if m.summary[key] is None else m.summary[key]
                         for m in models], np.float64)

    return ShadowRecord(
        arm=arm, pool_ids=pool.ids, pool_labels=pool.labels,
        population_labels=population.labels, augmentations=tuple(augmentations),
        in_mask=np.asarray(in_mask, bool), groups=groups,
        **{key: stack(key) for key in MODEL_ARRAYS},
        **{key: column(key) for key in ("train_accuracy", "test_accuracy", "wall_seconds",
                                        "noise_multiplier", "epsilon")})
