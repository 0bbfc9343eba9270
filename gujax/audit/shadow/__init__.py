"""Shadow models: train M models of one arm on random halves of a pool, then
attack each in turn with the others as its shadows.

    record = run_shadow_models(arm, pool=pool, population=test, model=model,
                               config=TrainConfig(...), num_models=8, workdir="runs/sgd")
    audit = attack(record)           # LiRA online/offline, loss, RMIA + D_j vs LiRA

or ``audit_arm(...)`` for both. The work is split in three modules:

- ``gujax.audit.shadow.storage``: the on-disk layout (``shadow.json``, one
  ``model_{m:03d}.npz/.json`` pair per model, written atomically), the
  resume check, loading finished models (``load_shadow_record``);
- ``gujax.audit.shadow.training``: membership masks, models prepared and
  trained ``models_at_once`` at a time (``gujax.train.train_stacked``, one
  step vmapped over the group), their logits on the pool and population;
- ``gujax.audit.shadow.attacks``: ``attack(record)``;

with the shared types (``ShadowSpec``, ``ShadowModel``, ``ShadowRecord``)
in ``gujax.audit.shadow.record``. A killed run called again continues with
the first unfinished group (from its last checkpoint, if it is the same
group); finished models are read back, never retrained. ``check_shadow_run``
finds what a run would refuse (bad input, a workdir of another run) before
anything is trained or written.
"""
from __future__ import annotations

import jax
from gujax.progress import progress_bar

from gujax import checks, sharding
from gujax.arms import Arm
from gujax.audit.shadow.attacks import (CanaryAudit, ShadowAudit, attack, canary_evaluation,
                                        group_scores, mean_over_members)
from gujax.audit.shadow.record import (AUGMENTATIONS, ShadowModel, ShadowRecord,
                                       ShadowSpec)
from gujax.audit.shadow.storage import (ResumeMismatch, ShadowStore, check_resume, identity,
                                        load_shadow_record)
from gujax.audit.shadow.training import ShadowTrainer, check_run
from gujax.data.dataset import Dataset

__all__ = ["AUGMENTATIONS", "CanaryAudit", "ResumeMismatch", "ShadowAudit", "ShadowModel", "ShadowRecord",
           "ShadowSpec", "attack", "audit_arm", "canary_evaluation", "group_scores", "check_shadow_run", "load_shadow_record",
           "mean_over_members", "run_shadow_models"]


def check_shadow_run(arm: Arm | ShadowSpec, *, pool: Dataset, population: Dataset,
                     workdir: str | None = None, resume: bool = True, **spec_fields) -> None:
    """What ``run_shadow_models`` with these arguments would refuse, found
    before any training and without writing anything: a bad spec, pool or
    population (``ValueError``), a batch larger than a model's training set,
    or (with ``resume`` and a ``workdir``) a workdir holding another run's
    models (``ResumeMismatch``, naming the settings that differ)."""
    spec = ShadowSpec.of(arm, **spec_fields)
    check_run(spec, pool, population)
    if resume and workdir is not None:
        check_resume(workdir, identity(spec, pool, population))


def _models(group) -> str:
    return f"model {group[0]}" if len(group) == 1 else f"models {group[0]}-{group[-1]}"


def run_shadow_models(arm: Arm | ShadowSpec, *, pool: Dataset, population: Dataset,
                      workdir: str, resume: bool = True, checkpoints: bool = True,
                      models_at_once: int = 1, progress: bool = True,
                      share: tuple[int, int] | None = None,
                      **spec_fields) -> ShadowRecord | None:
    """Train (resumably) the shadow models of an arm on random halves of
    ``pool`` and collect what the attacks need.

    Args:
      arm: a ``ShadowSpec``, or the arm (``gujax.arms.Arm``) with the spec's
        other fields as keywords: ``model``, ``config``, ``num_models`` (M >=
        2), ``seed`` (0), ``augmentations`` (("identity", "flip")),
        ``method`` ("ghost"); see ``ShadowSpec``.
      pool: the N examples membership is drawn over (uint8 images).
      population: Z held-out examples no model trains on (the test split):
        test accuracy and RMIA's reference population.
      workdir: this arm's folder (created; layout in
        ``gujax.audit.shadow.storage``).
      resume: keep finished models in ``workdir`` (they must come from the
        same run: ``shadow.json`` is checked); False deletes them first.
      checkpoints: let the trainer checkpoint inside the group being trained
        (so a kill loses at most ``config.checkpoint_every`` steps).
      models_at_once: train this many models together, one step vmapped over
        them (``gujax.train.train_stacked``; the same models to rounding).
        Pays on small models, whose steps leave the machine idle: 12 digits
        MLPs train about 2x faster 6 at a time on 2 CPU cores
        (``python -m experiments.stacked``); a killed run resumes group by
        group.
        With several local devices and ``models_at_once`` a multiple of
        their number, each group is split over them
        (``gujax.sharding.run_mesh``; the same models to rounding).
      progress: show a bar over the models, naming the group in training
        (the trainer's own bar over that group's steps is
        ``config.progress``).
      share: (process index, process count): train only the models m with
        m % count == index (``gujax.sharding.process_share``), e.g. one
        share per host of a shared ``workdir``; each share resumes on its
        own. Default: ``jax.process_index()``, ``jax.process_count()``,
        i.e. every model in one process, and under
        ``jax.distributed.initialize()`` each host its share, the hosts
        waiting for each other before the record is assembled.

    Returns:
      ``ShadowRecord``: the models trained by this call as they are in
      memory, those finished by an earlier call (or another share) read from
      ``workdir``; None if an explicit ``share`` leaves models of other
      shares unfinished (``load_shadow_record`` once they are done).
    """
    spec = ShadowSpec.of(arm, **spec_fields)
    models_at_once = checks.positive_int(models_at_once, "models_at_once")
    trainer = ShadowTrainer(spec, pool=pool, population=population)
    index, count = share if share is not None else (jax.process_index(), jax.process_count())
    if count > 1 and not resume:
        raise ValueError("resume=False would delete the other shares' models; clear the "
                         "workdir once, then run every share with resume=True")
    store = ShadowStore.open(workdir, identity(spec, pool, population), resume=resume)
    done = store.finished()
    mine = sharding.process_share(range(spec.num_models), process_index=index,
                                  process_count=count)
    todo = [m for m in mine if m not in done]
    trained = {}
    with progress_bar(desc=f"shadow models [{spec.arm.name}]", disable=not progress, unit="model",
                      initial=len(mine) - len(todo), total=len(mine)) as bar:
        for i in range(0, len(todo), models_at_once):
            group = todo[i:i + models_at_once]
            bar.set_postfix_str(f"training {_models(group)}")
            with store.training(group, share=(index, count)) as checkpoint_dir:
                models = trainer.train(group,
                                       checkpoint_dir=checkpoint_dir if checkpoints else None)
                for m, model in zip(group, models):
                    store.save(m, model)
            trained.update(zip(group, models))
            bar.update(len(group))
        bar.set_postfix_str("")
    if share is None and count > 1:
        # Under jax.distributed every host waits for the others' shares.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"gujax shadow models {workdir}")
    elif len(store.finished()) < spec.num_models:
        return None
    return store.record(trained, pool=pool, population=population, in_mask=trainer.in_mask)


def audit_arm(arm: Arm | ShadowSpec, *, attack_augmentations=None, **kwargs
              ) -> tuple[ShadowRecord, ShadowAudit]:
    """``run_shadow_models(arm, **kwargs)`` then ``attack`` on its record
    (with ``augmentations=attack_augmentations``)."""
    record = run_shadow_models(arm, **kwargs)
    return record, attack(record, augmentations=attack_augmentations)
