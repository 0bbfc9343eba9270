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
    """
    arm: Arm
    model: Any
    config: TrainConfig
    num_models: int
    seed: int = 0
    augmentations: tuple[str, ...] = ("identity", "flip")
    method: str = "ghost"

    def __post_init__(self):
        checks.positive_int(self.num_models, "num_models (each target needs shadows)",
                            minimum=2)
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


def assemble_record(models: Sequence[ShadowModel], *, arm: dict, augmentations,
                    pool: Dataset, population: Dataset, in_mask: np.ndarray) -> ShadowRecord:
    """Stack models 0..M-1 (in that order) into a ``ShadowRecord``."""
    def stack(key):
        return np.stack([m.arrays[key] for m in models])

    def column(key):
        return np.array([np.nan if m.summary[key] is None else m.summary[key]
                         for m in models], np.float64)

    return ShadowRecord(
        arm=arm, pool_ids=pool.ids, pool_labels=pool.labels,
        population_labels=population.labels, augmentations=tuple(augmentations),
        in_mask=np.asarray(in_mask, bool),
        **{key: stack(key) for key in MODEL_ARRAYS},
        **{key: column(key) for key in ("train_accuracy", "test_accuracy", "wall_seconds",
                                        "noise_multiplier", "epsilon")})
