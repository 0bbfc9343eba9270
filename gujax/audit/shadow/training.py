"""Shadow-model training: membership masks, per-model preparation, groups of
models trained together and the logits they are queried for.

Membership is drawn independently: each model takes each pool example with
probability 1/2 (``shadow_membership(..., balanced=False)``), so the shadow
group sizes carry no information about the target's membership
(docs/audit.md, "Shadow masks"). Under the canary protocol
(``ShadowSpec.always_in`` / ``canary_groups``) the base rows are IN in every
model and each canary group IN in exactly half of them
(``canary_membership_design``), as Aerni, Zhang & Tramer (2024) do.

``_fit_group`` trains a group through ``gujax.arms.train_runs``, the one way
an arm's runs are trained.
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gujax.arms import TrainingRun, train_runs
from gujax.audit.shadow.record import AUGMENTATIONS, ShadowModel, ShadowSpec
from gujax.data.dataset import Dataset, model_inputs
from gujax.data.splits import canary_membership_design, shadow_membership
from gujax.sharding import run_mesh


def check_data(pool: Dataset, population: Dataset) -> None:
    """The pool and population a run of shadow models can use."""
    if len(pool) < 2:
        raise ValueError(f"the pool needs at least 2 examples, got {len(pool)}")
    if len(population) < 1:
        raise ValueError("the population (held-out examples) is empty")
    if pool.images.shape[1:] != population.images.shape[1:]:
        raise ValueError(f"pool images {pool.images.shape[1:]} and population images "
                         f"{population.images.shape[1:]} differ in shape")


def membership(spec: ShadowSpec, pool: Dataset) -> np.ndarray:
    """(M, N) bool: independent Bernoulli(1/2) membership, or the canary
    protocol's design (module docstring)."""
    groups = spec.groups(len(pool))
    if groups is not None:
        return canary_membership_design(groups, spec.num_models, spec.seed)
    return shadow_membership(len(pool), spec.num_models, spec.seed, balanced=False)


def check_run(spec: ShadowSpec, pool: Dataset, population: Dataset) -> np.ndarray:
    """``check_data``, and every model's training set (about half the pool)
    holds at least a batch; returns the membership masks."""
    check_data(pool, population)
    in_mask = membership(spec, pool)
    smallest = int(in_mask.sum(1).min())
    batch_size = spec.arm.batch_size or spec.config.batch_size
    if batch_size > smallest:
        raise ValueError(f"batch_size {batch_size} exceeds the {smallest} examples "
                         f"of the smallest shadow training set (each model trains on a random "
                         f"half of the {len(pool)}-example pool)")
    return in_mask


def _no_ledger(n: int) -> SimpleNamespace:
    """The ledger arrays of a run that kept none: NaN disclosure (unknown,
    not zero), no step counts, nothing retired."""
    return SimpleNamespace(disclosure=np.full(n, np.nan, np.float32),
                           cumulative_gnq=np.full(n, np.nan, np.float32),
                           steps_used=np.zeros(n, np.int32), retired=np.zeros(n, bool))


def _query_fn(model, augmentations):
    """Jitted logits (B, A, C) of a batch (uint8 pixels or float features) under
    each augmentation."""
    @jax.jit
    def query(params, images):
        x = model_inputs(images)
        return jnp.stack([model.apply({"params": params}, AUGMENTATIONS[a](x))
                          for a in augmentations], axis=1)
    return query


def _logits(query, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = [np.asarray(query(params, images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float32)


class _Run(NamedTuple):
    """Model m of an arm, ready to train."""
    m: int
    rows: np.ndarray          # its members: positions in the pool
    seed: int
    params: dict


class _Fitted(NamedTuple):
    """What training left of one model, in the trainer-independent form."""
    params: dict
    disclosure: np.ndarray
    cumulative_gnq: np.ndarray
    steps_used: np.ndarray
    retired: np.ndarray
    noise_multiplier: float | None
    epsilon: float | None
    learning_rate: float
    sampling: str
    final_loss: float | None


def _group_mesh(runs: int):
    """The local devices' run mesh when a group splits evenly over several
    of them, else None (one device: nothing to split)."""
    devices = jax.local_devices()
    return run_mesh(devices) if len(devices) > 1 and runs % len(devices) == 0 else None


def _fit_group(spec: ShadowSpec, runs: Sequence[_Run], *, pool: Dataset,
               checkpoint_dir: str | None) -> tuple[list[_Fitted], float]:
    """Train ``runs`` together (one vmapped step); (fitted models, wall seconds).

    Ids are pool positions: the ledger is (N,) for every model, so all models
    of an arm share state shapes and (with a persistent compilation cache)
    one compiled step; each model's DP-SGD sigma is calibrated for its own
    training-set size (``gujax.arms.train_runs``). The trainer shows its step
    bar when ``spec.config.progress``.
    """
    start = time.perf_counter()
    trained = train_runs(
        spec.arm, [TrainingRun((pool.images[r.rows], pool.labels[r.rows], r.rows), r.seed,
                               r.params) for r in runs],
        spec.config, model=spec.model, num_examples=len(pool), method=spec.method,
        workdir=checkpoint_dir, resume=True, mesh=_group_mesh(len(runs)))
    jax.block_until_ready([t.params for t in trained])
    wall = time.perf_counter() - start
    fitted = []
    for t in trained:
        # The ledger is already indexed by pool position; OUT entries are 0.
        book = _no_ledger(len(pool)) if t.ledger is None else jax.device_get(t.ledger)
        fitted.append(_Fitted(
            params=t.params,
            disclosure=np.asarray(book.disclosure, np.float32),
            cumulative_gnq=np.asarray(book.cumulative_gnq, np.float32),
            steps_used=np.asarray(book.steps_used, np.int32),
            retired=np.asarray(book.retired, bool),
            noise_multiplier=t.noise_multiplier, epsilon=t.epsilon,
            learning_rate=t.config.learning_rate, sampling=t.config.sampling,
            final_loss=t.history[-1].get("loss") if t.history else None))
    return fitted, wall


class ShadowTrainer:
    """Trains the shadow models of ``spec`` on ``pool``, group by group, and
    queries them on the pool and the population."""

    def __init__(self, spec: ShadowSpec, *, pool: Dataset, population: Dataset):
        self.in_mask = check_run(spec, pool, population)
        self.spec, self.pool, self.population = spec, pool, population
        # One jitted query for the whole run: every group reuses its compilation.
        self._query = _query_fn(spec.model, spec.augmentations)

    def _prepare(self, m: int) -> _Run:
        seed = self.spec.seed * 100_003 + m  # distinct per (run seed, model)
        params = self.spec.model.init(jax.random.key(seed),
                                      model_inputs(self.pool.images[:1]))["params"]
        return _Run(m, np.flatnonzero(self.in_mask[m]), seed, params)

    def train(self, models: Sequence[int], *, checkpoint_dir: str | None = None
              ) -> list[ShadowModel]:
        """Train ``models`` together; their arrays and summaries, in that order.

        checkpoint_dir: the trainer checkpoints there (and resumes from it).
        """
        runs = [self._prepare(m) for m in models]
        fitted, wall = _fit_group(self.spec, runs, pool=self.pool,
                                  checkpoint_dir=checkpoint_dir)
        return [self._summarise(run, fit, wall, models) for run, fit in zip(runs, fitted)]

    def _summarise(self, run: _Run, fit: _Fitted, wall: float,
                   group: Sequence[int]) -> ShadowModel:
        batch = self.spec.config.eval_batch_size
        logits = _logits(self._query, fit.params, self.pool.images, batch)
        population_logits = _logits(self._query, fit.params, self.population.images, batch)
        correct = np.argmax(logits[:, 0], -1) == self.pool.labels
        summary = {
            "model": run.m, "num_train": len(run.rows),
            # Models trained together share their wall time equally.
            "wall_seconds": wall / len(group), "trained_with": list(group),
            "group_wall_seconds": wall,
            "train_accuracy": float(correct[run.rows].mean()),
            "test_accuracy": float((np.argmax(population_logits[:, 0], -1)
                                    == self.population.labels).mean()),
            "noise_multiplier": fit.noise_multiplier, "epsilon": fit.epsilon,
            "learning_rate": fit.learning_rate, "sampling": fit.sampling,
            "final_loss": fit.final_loss,
        }
        arrays = dict(logits=logits, population_logits=population_logits,
                      disclosure=fit.disclosure, cumulative_gnq=fit.cumulative_gnq,
                      steps_used=fit.steps_used, retired=fit.retired)
        return ShadowModel(arrays, summary)
