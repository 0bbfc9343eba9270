"""The experiments' calls into the library: an arm of the command line
trained (``train_arm``: ``gujax.arms.train_runs``, the one way an arm is
trained) and its shadow models audited (``shadow_audit``, checked beforehand
by ``check_shadow_audit``: ``gujax.audit.shadow``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments.cli import Settings, train_config
from experiments.registry import init_params
from gujax.arms import Arm, ArmRun, TrainingRun, train_runs
from gujax.audit.shadow import audit_arm, check_shadow_run
from gujax.data import Dataset


def train_arm(arm: Arm, settings: Settings, model, data: Sequence[tuple[np.ndarray, np.ndarray]],
              seeds: Sequence[int], *, snapshot_epochs: Sequence[int] = ()) -> list[ArmRun]:
    """Train one model of ``arm`` per (images uint8, labels) of ``data``
    (``gujax.arms.train_runs``), model m from the init of ``seeds[m]`` with
    its batches and noise seeded by it; example ids are positions 0..N-1.

    snapshot_epochs: keep the parameters at the end of these epochs
      (``ArmRun.snapshots``), from the same run.
    """
    if len(data) != len(seeds) or not data:
        raise ValueError(f"need one seed per training set, got {len(seeds)} for {len(data)}")
    runs = [TrainingRun((images, labels, np.arange(len(labels))), seed,
                        init_params(model, images.shape[1:], seed))
            for (images, labels), seed in zip(data, seeds)]
    return train_runs(arm, runs, train_config(settings), model=model, method=settings.method,
                      snapshot_epochs=snapshot_epochs)


def _shadow_arguments(settings: Settings, *, model, num_models: int,
                      query_augmentations: Sequence[str]) -> dict:
    """The spec of ``arm``'s shadow models (``gujax.audit.shadow.ShadowSpec``
    fields) under ``settings``."""
    return dict(model=model, config=train_config(settings), num_models=num_models,
                seed=settings.seed, augmentations=tuple(query_augmentations),
                method=settings.method)


def check_shadow_audit(arm: Arm, settings: Settings, *, pool: Dataset, population: Dataset,
                       model, num_models: int, query_augmentations: Sequence[str],
                       workdir: str | None = None, resume: bool = False) -> None:
    """What ``shadow_audit`` with these arguments would refuse, before any
    training: ``gujax.audit.shadow.check_shadow_run`` (a ``ValueError``, or
    with ``resume`` a ``ResumeMismatch`` naming the settings that changed)."""
    check_shadow_run(arm, pool=pool, population=population, workdir=workdir, resume=resume,
                     **_shadow_arguments(settings, model=model, num_models=num_models,
                                         query_augmentations=query_augmentations))


def shadow_audit(arm: Arm, settings: Settings, *, pool: Dataset, population: Dataset, model,
                 num_models: int, workdir: str, query_augmentations: Sequence[str],
                 attack_augmentations: Sequence[str] | None = None, resume: bool = False,
                 checkpoints: bool = True, models_at_once: int = 1):
    """``num_models`` shadow models of ``arm`` on random halves of ``pool``
    (``models_at_once`` at a time), each attacked with the others as its
    shadows: (ShadowRecord, ShadowAudit) of ``gujax.audit.shadow.audit_arm``."""
    return audit_arm(arm, pool=pool, population=population, workdir=workdir,
                     attack_augmentations=attack_augmentations, resume=resume,
                     checkpoints=checkpoints, models_at_once=models_at_once,
                     progress=settings.progress,
                     **_shadow_arguments(settings, model=model, num_models=num_models,
                                         query_augmentations=query_augmentations))
